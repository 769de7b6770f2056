"""The CPU of other processes as the benchmarks read it: to the nanosecond, and with the CPU of
threads that have ended (a server's idle worker threads end while it runs)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from benchmarks.procs import exact_cpu_seconds, tree_cpu_seconds, tree_cpu_used

# A child that spends 0.2 s of CPU in a thread of its own, ends the thread, says so and waits.
BURN_IN_A_THREAD = """
import sys, threading, time
def burn():
    while time.thread_time() < 0.2:
        pass
worker = threading.Thread(target=burn)
worker.start()
worker.join()
print("done", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def burnt() -> Iterator[int]:
    """A child that has burnt 0.2 s of CPU in a thread that has ended, still running: its pid."""
    child = subprocess.Popen(
        [sys.executable, "-c", BURN_IN_A_THREAD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "done\n"
        yield child.pid
    finally:
        child.kill()
        child.wait()


def test_a_process_keeps_the_cpu_of_its_threads_that_ended(burnt: int) -> None:
    assert exact_cpu_seconds(burnt) >= 0.2


def test_a_process_that_is_gone_has_no_cpu_to_read() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: no such process any more
    with pytest.raises(ProcessLookupError):
        exact_cpu_seconds(child.pid)


def test_a_tree_is_read_with_its_descendants(burnt: int) -> None:
    tree = tree_cpu_seconds(os.getpid())
    assert tree[burnt] >= 0.2 and tree[os.getpid()] > 0


def test_what_a_tree_used_counts_new_processes_whole_and_misses_ended_ones() -> None:
    before = {1: 1.0, 2: 2.0}
    after = {1: 1.5, 3: 0.25}  # 2 ended in between, 3 began
    assert tree_cpu_used(before, after) == pytest.approx(0.75)
    assert tree_cpu_used(after, after) == 0
