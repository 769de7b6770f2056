"""The workers as the API sees them."""

from __future__ import annotations

from sqlalchemy.orm import Session

from service.clock import utcnow
from service.schemas import WorkerList, WorkerRead
from service.store import worker_repo


def live_workers(session: Session, *, lease_s: float) -> WorkerList:
    """Workers that have not stopped and sent a heartbeat within one lease."""
    rows = worker_repo.live_workers(session, now=utcnow(), lease_s=lease_s)
    return WorkerList(workers=[WorkerRead.model_validate(row) for row in rows])
