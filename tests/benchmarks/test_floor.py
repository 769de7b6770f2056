"""The floor's thread counts: those the worker's tuner chooses among on the machine it runs on."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

from benchmarks.env import REPO_ROOT
from benchmarks.floor import floor_threads_text


def floor_threads_on(cores: set[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``floor_threads()`` and the worker's tuner's counts in a fresh process on ``cores``."""
    code = (
        "import os, sys; os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(',')}); "
        "from benchmarks.floor import floor_threads; "
        "from workers.tuning.threads import process_tuner; "
        "print((floor_threads(), process_tuner().candidates))"
    )
    printed = subprocess.run(
        [sys.executable, "-c", code, ",".join(map(str, sorted(cores)))],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    floor, tuner = ast.literal_eval(printed.strip())
    return tuple(floor), tuple(tuner)


def test_the_floor_is_timed_at_one_thread_on_one_core() -> None:
    assert floor_threads_on({min(os.sched_getaffinity(0))}) == ((1,), (1,))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_the_floor_is_timed_at_every_count_the_worker_may_choose() -> None:
    """On a machine with cores to spare the floor held to 1 and 2 threads while the worker
    trained at 4 or 8, and came out slower than the worker's whole job."""
    floor, tuner = floor_threads_on(set(sorted(os.sched_getaffinity(0))[:2]))
    assert floor == tuner
    assert floor in ((1,), (1, 2))  # (1,) where two threads would change a seeded job's bits


@pytest.mark.parametrize(
    ("counts", "text"),
    [
        ((1,), "1 thread"),
        ((1, 2), "the faster of 1 and 2 threads"),
        ((1, 2, 4, 8), "the fastest of 1, 2, 4 and 8 threads"),
    ],
)
def test_the_reports_name_the_floors_counts(counts: tuple[int, ...], text: str) -> None:
    assert floor_threads_text(counts) == text
