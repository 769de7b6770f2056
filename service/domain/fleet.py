"""The workers as the API sees them."""

from __future__ import annotations

from sqlalchemy.orm import Session

from service.schemas import WorkerList, WorkerRead
from service.store import worker_repo


def live_workers(session: Session, *, lease_s: float) -> WorkerList:
    """Workers that have not stopped and sent a heartbeat within one lease."""
    rows = worker_repo.live_workers(session, lease_s=lease_s)
    return WorkerList(
        workers=[
            WorkerRead(
                id=row.id,
                host=row.host,
                pid=row.pid,
                device=row.device,
                started_at=row.started_at,
                heartbeat_at=row.heartbeat_at,
                job_id=jobs[0] if jobs else None,
                job_ids=jobs,
            )
            for row, jobs in rows
        ]
    )
