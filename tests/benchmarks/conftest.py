"""Fixtures of the benchmarks' tests that poll a real API."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.orm import Session, sessionmaker

from tests.records import PARAMS, FakeTraining
from tests.support import api_process, local_env


@pytest.fixture
def training_job(sessions: sessionmaker[Session]) -> str:
    """A claimed job with three steps stored: what the pollers ask for."""
    training = FakeTraining(sessions, PARAMS)
    job_id = training.submit()
    training.claim()
    training.advance(3)
    return job_id


@pytest.fixture
def api_of_two(
    db_url: str, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], httpx.Client]]:
    """The API as the benchmarks run it, two processes, on :func:`db_url`."""
    env = local_env(db_url, tmp_path / "data", tmp_path, api_workers="2")
    with api_process(env, tmp_path / "api.log") as (proc, client):
        yield proc, client
