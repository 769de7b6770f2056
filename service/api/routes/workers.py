"""The worker processes serving the queue."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import SessionDep, SettingsDep
from service.domain import fleet
from service.schemas import WorkerList

router = APIRouter(prefix="/workers", tags=["workers"])


@router.get("", response_model=WorkerList)
def list_workers(session: SessionDep, settings: SettingsDep) -> WorkerList:
    """Live workers (heard from within one lease) and the job each is running."""
    return fleet.live_workers(session, lease_s=settings.lease_s)
