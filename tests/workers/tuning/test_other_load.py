"""What other processes do on this process's cores, from the kernel's accounting."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import wait_for
from workers.tuning import other_load
from workers.tuning.other_load import (
    cores_busy_s,
    own_runnable,
    read_other_load,
    runnable_now,
    ticks_per_s,
)

STAT = """cpu  900 0 300 5000 70 0 10 20 0 0
cpu0 400 5 100 2500 30 0 4 10 7 0
cpu1 500 0 200 2500 40 1 6 10 0 0
intr 12345 0 9 not-a-core-line
cpu7 999 999 999 999 999 999 999 999 0 0
ctxt 5551212
procs_running 3
procs_blocked 0
"""


def test_the_cores_busy_time_is_all_but_idle_and_waiting_on_io() -> None:
    # cpu0: user 400 + nice 5 + system 100 + irq 0 + softirq 4 + steal 10 = 519 (guest 7 is in
    # user); cpu1: 500 + 200 + 1 + 6 + 10 = 717.
    assert cores_busy_s(STAT, {0, 1}, 100) == pytest.approx(12.36)
    assert cores_busy_s(STAT, {0, 1}, 1000) == pytest.approx(1.236)  # ticks of USER_HZ


def test_no_busy_time_unless_the_cores_are_the_machines() -> None:
    # A container's /proc that numbers its cores otherwise than the affinity mask does.
    assert cores_busy_s(STAT, {0, 2}, 100) is None
    # A cpuset: the machine's runnable count would speak for cores this process does not use.
    assert cores_busy_s(STAT, {0}, 100) is None
    assert cores_busy_s(STAT, {0, 1, 7}, 100) is None  # after the cores' lines: never read


def test_what_is_runnable_is_the_machines_count() -> None:
    assert runnable_now(STAT) == 3
    assert runnable_now(STAT.replace("procs_running 3\n", "")) is None


def _tasks(root: Path, states: str) -> Path:
    for n, state in enumerate(states):
        (root / str(n)).mkdir(parents=True)
        (root / str(n) / "stat").write_text(f"{n} (a (thread) name) {state} 1 2 3\n")
    return root


def test_this_processs_own_runnable_threads_are_counted(tmp_path: Path) -> None:
    assert own_runnable(_tasks(tmp_path / "a", "RSRD")) == 2
    assert own_runnable(_tasks(tmp_path / "b", "S")) == 0


def test_a_reading_is_the_cores_busy_time_less_this_processs_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stat = tmp_path / "stat"
    stat.write_text(STAT)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    monkeypatch.setattr(time, "process_time", lambda: 2.0)
    monkeypatch.setattr(other_load, "ticks_per_s", lambda: 100)
    reading = read_other_load(stat, _tasks(tmp_path / "tasks", "RRS"))
    assert reading is not None
    assert reading.cpu_s == pytest.approx(12.36 - 2.0)
    assert reading.runnable == 1  # 3 on the machine, 2 of them this process's


@pytest.mark.parametrize(
    "text",
    [
        "",
        STAT.replace("cpu1 500", "cpu1 five-hundred"),
        STAT.replace("procs_running 3", "procs_running many"),
        STAT.replace("procs_running 3", "procs_running"),
    ],
)
def test_no_reading_where_the_file_cannot_say(
    text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stat = tmp_path / "stat"
    stat.write_text(text)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    assert read_other_load(stat) is None


def test_no_reading_without_the_file(tmp_path: Path) -> None:
    assert read_other_load(tmp_path / "no-such-file") is None


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / ticks_per_s()  # utime, stime


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="Linux's /proc/stat")
def test_a_process_beside_this_one_shows_in_the_reading() -> None:
    if read_other_load() is None:
        pytest.skip("no reading here: this process may not use every core (a cpuset)")
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        wait_for(lambda: _cpu_s(hog.pid) > 0.05, timeout_s=30, what="the hog running")
        before = read_other_load()  # before the hog's count: none of its CPU between is lost
        hog_before = _cpu_s(hog.pid)
        wait_for(lambda: _cpu_s(hog.pid) - hog_before > 0.3, timeout_s=60, what="the hog's CPU")
        hog_used, after = _cpu_s(hog.pid) - hog_before, read_other_load()
    finally:
        hog.kill()
        hog.wait()
    assert before is not None
    assert after is not None
    # Every tick the hog used is the others' (ticks are counted per core: a few round off).
    tick, cores = 1 / ticks_per_s(), len(os.sched_getaffinity(0))
    assert after.cpu_s - before.cpu_s >= hog_used - (2 * cores + 2) * tick
    assert before.runnable >= 1  # the hog never sleeps: runnable at every reading
    assert after.runnable >= 1
