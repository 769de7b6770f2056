"""The metrics benchmark's poller (wrk with benchmarks/wrk_poll.lua) against a real API, on both
databases: it follows a job's steps as a live chart does, and a refused poll fails the run."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.orm import Session, sessionmaker

from benchmarks.series_clients import Poller
from tests.records import PARAMS, FakeTraining
from tests.support import api_server, local_env, needs_wrk, wait_for

pytestmark = needs_wrk
RATE_HZ = 100.0
CONNECTIONS = 2


@pytest.fixture
def api(db_url: str, tmp_path: Path) -> Iterator[tuple[httpx.Client, Path]]:
    """The API with its access log on: the log shows each poll's query."""
    log = tmp_path / "api.log"
    env = local_env(db_url, tmp_path / "data", tmp_path, access_log="true")
    with api_server(env, log) as client:
        yield client, log


def polled_after(log: Path, job_id: str) -> set[int]:
    """The ``after_step`` of every metrics poll of the job in the access log."""
    pattern = rf"GET /jobs/{job_id}/metrics\?after_step=(\d+) HTTP/1.1\" 200"
    return {int(n) for n in re.findall(pattern, log.read_text())}


def test_the_poller_asks_for_the_steps_after_the_last_it_saw(
    api: tuple[httpx.Client, Path], sessions: sessionmaker[Session]
) -> None:
    client, log = api
    training = FakeTraining(sessions, PARAMS)
    job_id = training.submit()
    training.claim()
    training.advance(3)
    with Poller(str(client.base_url), job_id, RATE_HZ, CONNECTIONS) as poller:
        wait_for(lambda: 0 in polled_after(log, job_id), timeout_s=30, what="a first poll")
        wait_for(lambda: 3 in polled_after(log, job_id), timeout_s=30, what="polls after step 3")
        training.advance(2)
        wait_for(lambda: 5 in polled_after(log, job_id), timeout_s=30, what="polls after step 5")
        polls = poller.stop()
    # The connections followed the steps: they asked after 0, then after what they were sent.
    assert polls >= 3
    assert polled_after(log, job_id) <= {0, 3, 5}
    assert poller.p50_ms > 0 and poller.rate_hz > 0 and poller.cpu_s > 0


def test_a_poller_left_running_is_stopped_with_its_block(api: tuple[httpx.Client, Path]) -> None:
    client, log = api
    with Poller(str(client.base_url), "0" * 32, RATE_HZ, CONNECTIONS) as poller:
        procs = list(poller._procs)
        assert len(procs) == CONNECTIONS
        wait_for(lambda: "/metrics" in log.read_text(), timeout_s=30, what="a poll")
        # The run fails here (a job that never ends, say): no stop() is called.
    assert all(proc.returncode is not None for proc in procs)


def test_a_refused_poll_fails_the_run(api: tuple[httpx.Client, Path]) -> None:
    client, log = api
    missing = "0" * 32
    with Poller(str(client.base_url), missing, RATE_HZ, CONNECTIONS) as poller:
        wait_for(
            lambda: f"GET /jobs/{missing}/metrics" in log.read_text(),
            timeout_s=30,
            what="a poll of the missing job",
        )
        with pytest.raises(RuntimeError, match="refused or failed"):
            poller.stop()
