"""How much CPU other processes have taken on this process's cores: the thread tuner's sign that
a load which made fewer threads win has gone (:mod:`workers.threads`).

A count of one thread hardly notices a process beside it, so its own steps cannot tell that
the process has left; the cores' own accounting can. Linux's ``/proc/stat`` keeps each core's
busy time, in ticks of 10 ms but summed exactly, so over half a second it is within a few
percent of a core; less this process's own CPU time, what is left is the others'. Elsewhere
(macOS, Windows), or where the file cannot be read, there is no reading and the tuner goes
without.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PROC_STAT = Path("/proc/stat")
IDLE_FIELDS = (3, 4)  # idle, iowait; user … steal (the first 8 fields) else, guest is in user
BUSY_FIELDS = 8


def ticks_per_s() -> int:
    """The unit of ``/proc/stat`` (USER_HZ, 100 nearly everywhere)."""
    try:
        return os.sysconf("SC_CLK_TCK")
    except (AttributeError, ValueError, OSError):
        return 100


def cores_busy_s(text: str, cores: set[int], per_s: int) -> float:
    """Seconds the listed cores have been busy since boot, from ``/proc/stat``'s ``cpuN`` lines.

    Time stolen by a hypervisor counts as busy: that core was someone else's meanwhile.
    """
    ticks = 0
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu"):
            break  # the cores' lines come first; the rest (interrupts …) is long
        if name == "cpu" or int(name[3:]) not in cores:
            continue
        values = [int(v) for v in rest.split()[:BUSY_FIELDS]]
        ticks += sum(values) - sum(values[i] for i in IDLE_FIELDS)
    return ticks / per_s


def others_cpu_s(stat: Path = PROC_STAT) -> float | None:
    """CPU seconds that everything but this process has used on its cores since boot (a running
    count: only differences mean anything), or None where the cores' accounting is not readable."""
    try:
        cores = os.sched_getaffinity(0)
        text = stat.read_text()
    except (AttributeError, OSError):
        return None
    return cores_busy_s(text, cores, ticks_per_s()) - time.process_time()
