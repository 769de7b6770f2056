"""The metrics benchmark's stream client (benchmarks/stream_client.py) against a real API: it
follows each stream to its end and counts the events a client parses; a refused stream fails
the run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.orm import Session, sessionmaker

from benchmarks.stream_followers import Followers
from service import sse
from tests.records import PARAMS, FakeTraining
from tests.support import api_server, local_env


@pytest.fixture
def api(db_url: str, tmp_path: Path) -> Iterator[httpx.Client]:
    env = local_env(db_url, tmp_path / "data", tmp_path)
    with api_server(env, tmp_path / "api.log") as client:
        yield client


def test_every_stream_is_read_to_its_end(
    api: httpx.Client, sessions: sessionmaker[Session]
) -> None:
    training = FakeTraining(sessions, PARAMS)
    job_id = training.submit()
    training.claim()
    training.run_epoch(0.5)
    training.finish()
    with api.stream("GET", f"/jobs/{job_id}/events") as response:
        body = response.read()
    expected = len(list(sse.parse(body.decode().splitlines())))
    assert expected >= 3  # a status, steps and the final status at least
    with Followers(str(api.base_url)) as followers:
        followers.open(job_id, 3)
        carried = followers.ended()
        assert (carried.events, carried.body_bytes) == (3 * expected, 3 * len(body))
        assert 3 <= carried.chunks <= 3 * expected  # at least one each, an event at most
        followers.open(job_id, 1)  # the client carries on with the next job
        assert followers.ended().events == expected
        assert followers.cpu_s > 0


def test_a_refused_stream_fails_the_run(api: httpx.Client) -> None:
    with Followers(str(api.base_url)) as followers:
        followers.open("0" * 32, 2)  # no such job: 404
        with pytest.raises(RuntimeError, match="stream client exited"):
            followers.ended()
