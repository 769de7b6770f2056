"""CPU time of running processes (Linux /proc): how much of the machine a figure used."""

from __future__ import annotations

import os
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces; everything after its ")" is space-separated.
    return text[text.rindex(")") + 2 :].split()


def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (found by scanning /proc for parent ids)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def cpu_seconds(pid: int, *, with_children: bool = True) -> float:
    """User + system CPU seconds ``pid`` (and its live descendants) have used so far."""
    total = 0.0
    for p in [pid, *(children(pid) if with_children else [])]:
        fields = _stat_fields(p)
        if fields is not None:
            # utime and stime are fields 14 and 15 of /proc/PID/stat (1-based, with pid, comm).
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


def exact_cpu_seconds(pid: int) -> float:
    """CPU seconds of every thread of ``pid`` so far, to the nanosecond (/proc/PID/task/*/
    schedstat): for a process that uses a few milliseconds, which /proc/PID/stat's 10 ms ticks
    would mostly round away."""
    total = 0
    for task in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            total += int(task.read_text().split()[0])
        except (OSError, IndexError, ValueError):
            continue  # a thread that ended meanwhile
    return total / 1e9
