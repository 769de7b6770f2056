"""What other processes are doing on this process's cores: the thread tuner's sign that a load
which made fewer threads win has gone (:mod:`workers.tuning.threads`).

A count of one thread hardly notices a process beside it, so its own steps cannot tell that the
process has left; the kernel's accounting can. Linux's ``/proc/stat`` gives each core's busy
time (sampled at the scheduler's tick, counted in 10-ms units: over 0.2 s on two cores it is
within about a tenth of a core) and how many tasks are runnable right now. Less this process's
own CPU time, the cores' busy time is the others'; the runnable count catches a load that began
within the time read over (its share of that time can still be small). Elsewhere (macOS,
Windows), or where the file does not describe this process's cores (a container whose
``/proc`` shows other numbers), there is no reading and the tuner goes without.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

PROC_STAT = Path("/proc/stat")
FIELDS_READ = 8  # user nice system idle iowait irq softirq steal (guest is counted in user)
IDLE_FIELDS = (3, 4)  # idle, iowait: the rest of those is busy, a hypervisor's steal included
RUNNABLE = "\nprocs_running "


@dataclass(frozen=True)
class OtherLoad:
    """One reading: ``cpu_s``, a running count of the CPU seconds everything but this process
    has used on its cores (only differences mean anything); ``runnable``, how many tasks on the
    machine are runnable now besides the one reading (this process's others among them)."""

    cpu_s: float
    runnable: int


def ticks_per_s() -> int:
    """The unit ``/proc/stat`` counts time in (USER_HZ), which a kernel may set otherwise."""
    try:
        return os.sysconf("SC_CLK_TCK")
    except (AttributeError, ValueError, OSError):
        return 100


def cores_busy_s(text: str, cores: set[int], per_s: int) -> float | None:
    """Seconds the listed cores have been busy since boot, from ``/proc/stat``'s ``cpuN`` lines;
    None when a core of them has no line (the file describes other cores than this process's)."""
    ticks, seen = 0, set()
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu"):
            break  # the cores' lines come first; the rest (interrupts …) is long
        if name == "cpu" or int(name[3:]) not in cores:
            continue
        values = [int(v) for v in rest.split()[:FIELDS_READ]]
        ticks += sum(values) - sum(values[i] for i in IDLE_FIELDS)
        seen.add(int(name[3:]))
    return ticks / per_s if seen == cores else None


def runnable_now(text: str) -> int | None:
    """Tasks runnable on the machine now, less the one reading (``procs_running``)."""
    start = text.find(RUNNABLE)
    if start < 0:
        return None
    return int(text[start + len(RUNNABLE) :].split(maxsplit=1)[0]) - 1


def read_other_load(stat: Path = PROC_STAT) -> OtherLoad | None:
    """What other processes are doing on this process's cores now, or None where ``stat``
    cannot say it."""
    try:
        cores = os.sched_getaffinity(0)
        text = stat.read_text()
        busy, runnable = cores_busy_s(text, cores, ticks_per_s()), runnable_now(text)
    except (AttributeError, OSError, ValueError, IndexError):
        return None
    if busy is None or runnable is None:
        return None
    return OtherLoad(cpu_s=busy - time.process_time(), runnable=runnable)
