"""What other processes are doing on this process's cores: the thread tuner's sign that a load
which made fewer threads win has gone (:mod:`workers.tuning.threads`).

A count of one thread hardly notices a process beside it, so its own steps cannot tell that the
process has left; the kernel's accounting can. Linux's ``/proc/stat`` gives each core's busy
time (sampled at the scheduler's tick, counted in 10-ms units: over 0.2 s on two cores it is
within about a tenth of a core) and how many tasks are runnable right now. Less this process's
own CPU time, the cores' busy time is the others'; less this process's own runnable threads
(``/proc/self/task``), the runnable tasks are the others', which catches a load that began late
in the time read over (its share of that time can still be small). The runnable count is the
machine's, so it speaks for this process's cores only where they are all of the machine's.
Elsewhere (macOS, Windows), where this process may use only some cores (a cpuset), or where the
file does not describe its cores (a container whose ``/proc`` shows other numbers), there is no
reading and the tuner goes without.
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
OWN_THREADS = Path("/proc/self/task")


@dataclass(frozen=True)
class OtherLoad:
    """One reading: ``cpu_s``, a running count of the CPU seconds everything but this process
    has used on its cores (only differences mean anything); ``runnable``, how many tasks of
    other processes are runnable now."""

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
    None unless those are exactly the machine's cores (a core without a line: the file
    describes other cores; a line for a core not listed: the machine's runnable count would
    speak for cores this process does not use)."""
    ticks, seen = 0, set()
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu"):
            break  # the cores' lines come first; the rest (interrupts …) is long
        if name == "cpu":
            continue
        seen.add(int(name[3:]))
        values = [int(v) for v in rest.split()[:FIELDS_READ]]
        ticks += sum(values) - sum(values[i] for i in IDLE_FIELDS)
    return ticks / per_s if seen == cores else None


def runnable_now(text: str) -> int | None:
    """Tasks runnable on the machine now, the one reading included (``procs_running``)."""
    start = text.find(RUNNABLE)
    if start < 0:
        return None
    return int(text[start + len(RUNNABLE) :].split(maxsplit=1)[0])


def own_runnable(tasks: Path = OWN_THREADS) -> int:
    """This process's threads that are runnable now (the one reading among them)."""
    running = 0
    for task in tasks.iterdir():
        try:
            state = (task / "stat").read_text().rpartition(")")[2].split(maxsplit=1)[0]
        except (OSError, IndexError):  # the thread ended meanwhile
            continue
        running += state == "R"
    return running


def read_other_load(stat: Path = PROC_STAT, tasks: Path = OWN_THREADS) -> OtherLoad | None:
    """What other processes are doing on this process's cores now, or None where ``stat``
    cannot say it."""
    try:
        cores = os.sched_getaffinity(0)
        own = own_runnable(tasks)
        text = stat.read_text()
        busy, runnable = cores_busy_s(text, cores, ticks_per_s()), runnable_now(text)
    except (AttributeError, OSError, ValueError, IndexError):
        return None
    if busy is None or runnable is None:
        return None
    return OtherLoad(cpu_s=busy - time.process_time(), runnable=max(0, runnable - own))
