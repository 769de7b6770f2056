"""Liveness."""

from __future__ import annotations

from fastapi import APIRouter

from service.schemas import Health

router = APIRouter(tags=["health"])


# HEAD is the GET's without the body (asgi.HeadAsGet).
@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The API process is up. Never touches the database (it answers through an outage),
    and runs on the event loop: no wait for a thread, even when every thread is busy."""
    return Health(status="ok")
