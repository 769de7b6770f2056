"""CPU time of running processes (Linux /proc): how much of the machine a figure used."""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_LIBC = ctypes.CDLL(None, use_errno=True)


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
    """CPU seconds ``pid`` has used so far, every thread's, those that have ended included, to
    the nanosecond: the process's CPU-time clock (clock_getcpuclockid(3)). For a process that
    uses a few milliseconds, which /proc/PID/stat's 10 ms ticks would mostly round away; and
    not a sum over /proc/PID/task, which forgets a thread's CPU once the thread ends (the API's
    idle worker threads end after 10 s). ProcessLookupError once the process is gone."""
    clock = ctypes.c_int()
    if _LIBC.clock_getcpuclockid(pid, ctypes.byref(clock)) != 0:
        raise ProcessLookupError(pid)
    try:
        return time.clock_gettime(clock.value)
    except OSError as exc:  # it ended meanwhile
        raise ProcessLookupError(pid) from exc


def tree_cpu_seconds(pid: int) -> dict[int, float]:
    """Every live process of ``pid``'s tree (``pid`` and its descendants): the CPU seconds each
    has used so far (:func:`exact_cpu_seconds`)."""
    used: dict[int, float] = {}
    for p in [pid, *children(pid)]:
        try:
            used[p] = exact_cpu_seconds(p)
        except ProcessLookupError:
            continue
    return used


def tree_cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """The CPU seconds a tree used between two readings of :func:`tree_cpu_seconds`. A process
    begun in between counts whole; one that began and ended in between is missed (so this is a
    lower bound)."""
    return sum(seconds - before.get(p, 0.0) for p, seconds in after.items())
