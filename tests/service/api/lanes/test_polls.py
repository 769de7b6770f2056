"""Which metrics polls the fast lane reads itself."""

from __future__ import annotations

import pytest

from service.api.lanes.polls import METRICS_PATH, poll_query


def read(query: bytes) -> tuple[int, int] | None:
    return poll_query(query, default_limit=1000, max_limit=100_000)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (b"", (0, 1000)),
        (b"after_step=0", (0, 1000)),
        (b"after_step=4711", (4711, 1000)),
        (b"limit=1", (0, 1)),
        (b"limit=100000&after_step=9", (9, 100_000)),
    ],
)
def test_plain_polls_are_read(query: bytes, expected: tuple[int, int]) -> None:
    assert read(query) == expected


@pytest.mark.parametrize(
    "query",
    [
        b"limit=0",
        b"limit=100001",
        b"limit=010",
        b"after_step=-1",
        b"after_step=+1",
        b"after_step=1.0",
        b"after_step=",
        b"after_step=" + b"9" * 19,  # past a 64-bit column: the route's to judge
        b"after_step=1&after_step=2",
        b"limt=5",
        b"after_step=1&x=",
    ],
)
def test_every_other_query_is_left_to_the_route(query: bytes) -> None:
    assert read(query) is None


def test_only_a_job_ids_metrics_path_is_matched() -> None:
    job = "0123456789abcdef0123456789abcdef"
    assert METRICS_PATH.fullmatch(f"/jobs/{job}/metrics")
    for path in (f"/jobs/{job}/metrics/", f"/jobs/{job.upper()}/metrics", "/jobs/x/metrics"):
        assert METRICS_PATH.fullmatch(path) is None
