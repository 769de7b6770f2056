"""Other processes' CPU on this process's cores, from the cores' own accounting."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import wait_for
from workers import other_load
from workers.other_load import cores_busy_s, others_cpu_s, ticks_per_s

STAT = """cpu  900 0 300 5000 70 0 10 20 0 0
cpu0 400 5 100 2500 30 0 4 10 7 0
cpu1 500 0 200 2500 40 1 6 10 0 0
intr 12345 0 9 not-a-core-line
cpu7 999 999 999 999 999 999 999 999 0 0
"""


def test_a_cores_busy_time_is_all_but_idle_and_waiting_on_io() -> None:
    # cpu0: user 400 + nice 5 + system 100 + irq 0 + softirq 4 + steal 10; guest (7) is in user.
    assert cores_busy_s(STAT, {0}, 100) == pytest.approx(5.19)
    assert cores_busy_s(STAT, {1}, 100) == pytest.approx(7.17)
    assert cores_busy_s(STAT, {0, 1}, 100) == pytest.approx(12.36)
    assert cores_busy_s(STAT, {0}, 1000) == pytest.approx(0.519)  # ticks of USER_HZ


def test_only_the_cores_this_process_may_use_count_and_reading_stops_at_the_interrupts() -> None:
    assert cores_busy_s(STAT, {2, 3}, 100) == 0.0
    assert cores_busy_s(STAT, {7}, 100) == 0.0  # after the cores' lines: never read


def test_others_cpu_is_the_cores_busy_time_less_this_processs_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stat = tmp_path / "stat"
    stat.write_text(STAT)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    monkeypatch.setattr(time, "process_time", lambda: 2.0)
    monkeypatch.setattr(other_load, "ticks_per_s", lambda: 100)
    assert others_cpu_s(stat) == pytest.approx(12.36 - 2.0)


def test_no_reading_where_the_cores_accounting_cannot_be_read(tmp_path: Path) -> None:
    assert others_cpu_s(tmp_path / "no-such-file") is None


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / ticks_per_s()  # utime, stime


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="Linux's /proc/stat")
def test_a_process_beside_this_one_shows_in_the_others_cpu() -> None:
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        wait_for(lambda: _cpu_s(hog.pid) > 0.05, timeout_s=30, what="the hog running")
        hog_before, before = _cpu_s(hog.pid), others_cpu_s()
        wait_for(lambda: _cpu_s(hog.pid) - hog_before > 0.3, timeout_s=60, what="the hog's CPU")
        hog_used, after = _cpu_s(hog.pid) - hog_before, others_cpu_s()
    finally:
        hog.kill()
        hog.wait()
    assert before is not None
    assert after is not None
    # Every tick the hog used is the others' (ticks are counted per core: a few round off).
    tick, cores = 1 / ticks_per_s(), len(os.sched_getaffinity(0))
    assert after - before >= hog_used - (2 * cores + 2) * tick
