"""How many intra-op threads a CPU worker trains with: whichever count its own steps run fastest at.

On a quiet machine two threads train the small MLP faster than one; when another process wants
one of the cores, two OpenMP threads that spin-wait on each other make every step several times
slower, while one thread hardly notices (docs/benchmarks.md). Neither count is right for long,
so ``MNIST_TORCH_THREADS=auto`` measures: a few steps at each candidate count, then the fastest
count until the next check. When fewer threads than the most win a pass by less than a load
that takes a core makes them (``ABANDON_FACTOR``), every count is timed once more, and the
count whose faster pass is the fastest holds (a transient, such as a core's vCPU waking after
the worker idled, slows one window; a load that lasts slows both). While fewer threads than the
most hold, the cores they leave are watched (:mod:`workers.tuning.other_load`), and the counts
are timed again once other processes leave the next count's cores idle (``SPARE_CORE``), but
not sooner after the last choice than a wait that doubles each time fewer threads win again
(``MAX_LOOK_WAIT_S``): a load that stays would make every look cost.
Intervals that hold anything but training steps (a flush, an evaluation, a checkpoint) are not
timed, nor are steps that ran beside the worker's own flushes and training states (they stall
any count, and only for the write's milliseconds). A count's
mean step time stands for it, without its slowest few steps, so a stray slow step does not
decide it; a median would not do: a process that takes a core now and then (an API answering 200
polls a second) stalls one step in several at two threads, and those stalls are the cost. While
a count holds, its steps are still timed: when they run well slower than when it was chosen, the
counts are timed again, and so they are when fewer threads than the most run well faster (the
load that chose them lifted; the speed-up waits as a look does).

A switch of count mid-job must not change what a seeded job records. Matrix products split
their sums across threads, and by default MKL splits them differently at different counts,
so the losses drift apart within a few steps. Importing :mod:`service` turns on MKL's strict
reproducible mode, in which they do not; and the process's tuner only chooses among the
counts whose training steps give one thread's bits, checked when it is made
(:mod:`workers.tuning.same_bits`; no MKL, a CPU without AVX2, or a mode set otherwise leaves it
one thread).
"""

from __future__ import annotations

import functools
import logging
import os
import statistics
import time
from collections.abc import Callable

import torch

from workers.tuning.other_load import OtherLoad, read_other_load
from workers.tuning.same_bits import same_bits_counts

log = logging.getLogger("workers")

PROBE_STEPS = 16  # timed steps per candidate count (a 10,000-image epoch has 157)
TRIMMED = 8  # one timed step in this many, the slowest, is left out of a count's time
RECHECK_S = 5.0  # how many seconds of steps a choice holds before the counts are timed again...
SLOWDOWN_FACTOR = 1.3  # ...unless its steps get this much slower first,
# or, holding fewer threads than the most, this much faster: the load that made fewer threads
# win has lifted, and more may win now. Without it a worker that chose one thread while 100
# polls a second ran kept it for the next 5 s of steps, ~14 jobs, when two ran them 1.3× faster.
# As large as the slowdown's: at 1.15 the windows' own spread under steady polls set it off,
# and each look at two threads there costs a few collapsed steps (docs/benchmarks.md).
SPEEDUP_FACTOR = SLOWDOWN_FACTOR
# A count whose first timed steps already run this much slower than the fastest count timed
# so far cannot win: its timing stops there. Two threads on a core another process holds run
# a step 5-20× slower (docs/benchmarks.md), and 16 such steps cost a short job more than the
# whole probe saves. (A held count is not judged on so few: the steps after each flush run
# that slow for a moment, and timing the counts again at each cost more than it saved.)
ABANDON_AFTER, ABANDON_FACTOR = 2, 2.0
MAX_THREADS = 8  # a 784×100 MLP on batches of 64 gains nothing from more
# Steps beside the worker's own writes are not timed (:meth:`ThreadTuner.step`), but no more
# than this many in a row: a write that hangs (a database gone quiet) must not freeze the choice.
MAX_UNTIMED_STEPS = 4 * PROBE_STEPS
# Holding fewer threads than the most, the counts are timed again once the cores that the next count
# up would add sat idle, as other processes used them: over the last reading's stretch (readings at
# most every LOOK_AFTER_S of the clock, a stretch of at most MAX_STRETCH_S) no more than SPARE_CORE
# of them in use on average, and none of them taken by a runnable task at the reading (a load that
# began late in the stretch). One thread's own steps hardly slow beside a load, so they cannot tell
# that it has gone: one thread chosen while a job was watched held for RECHECK_S of steps after its
# watchers left. Timing the counts at each job's start instead cost up to 40% of a job beside a load
# that lasts (docs/benchmarks.md). Holding fewer threads than the most, no timing (a look, the held
# count's speed-up, or its slow-down where no fewer threads are left to try) comes sooner than a
# wait after the last choice; each that chooses the count held before again doubles it, up to
# MAX_LOOK_WAIT_S, and so do the most threads slowing within that many seconds of steps after they
# won; any other choice of fewer threads than the most starts it at LOOK_AFTER_S (choosing the most
# keeps it). Under an API answering 200 polls a second one thread's windows swing by more than
# SLOWDOWN_FACTOR either way, and each swing timed two threads, which stall beside the polls: 3-10
# timings a job, a job slower than at either count held (docs/benchmarks.md, "2026-12-05, morning").
LOOK_AFTER_S = 0.2
# The longest wait: while a load that makes two threads lose stays, a look costs a few stalled
# steps this often; where no reading tells that it went, one thread holds about this long after
# (2-4 jobs).
MAX_LOOK_WAIT_S = 1.6
# Within the wait, a look is taken all the same once other processes use the cores at
# most LIFTED_SHARE of what they used when more threads last lost, and LIFTED_CORES less: the
# load went (readings of a 0.2-s stretch are off by up to a tenth of a core, /proc/stat counting
# ticks of 10 ms). Without it one thread would hold for the rest of the wait once the load that
# made two threads lose went (a watched job's pollers, as they stop).
LIFTED_SHARE, LIFTED_CORES = 0.5, 0.1
MAX_STRETCH_S = 2.0  # longer (the worker idled between jobs): read again, and judge after that
SPARE_CORE = 0.5
# A reading that puts more cores idle than there are, by this much, does not describe this
# process's cores (its own CPU counted elsewhere): the cores are not watched until next choice.
IMPLAUSIBLE_CORES = 0.25


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def typical_step_s(timed: list[float]) -> float:
    """The mean step time without the slowest ``len // TRIMMED`` steps (at least one)."""
    kept = sorted(timed)[: len(timed) - max(1, len(timed) // TRIMMED)] or timed
    return statistics.fmean(kept)


def candidate_threads(cores: int) -> tuple[int, ...]:
    """1, 2, 4 … up to ``cores`` (and ``cores`` itself), at most :data:`MAX_THREADS`."""
    top = max(1, min(cores, MAX_THREADS))
    counts = {1, top}
    n = 2
    while n < top:
        counts.add(n)
        n *= 2
    return tuple(sorted(counts))


class ThreadTuner:
    """Times training steps at each candidate thread count and keeps the fastest.

    The reporter calls :meth:`step` once per training step and :meth:`resume_timing` after
    anything between steps that is not a step (it must not count against the thread count).
    Nor does a step that ran beside the worker's own writes: they stall it at any count, and
    only for the write's few milliseconds (:class:`workers.reporting.writers.Activity`).
    """

    def __init__(
        self,
        candidates: tuple[int, ...],
        *,
        probe_steps: int = PROBE_STEPS,
        recheck_s: float = RECHECK_S,
        clock: Callable[[], float] = time.perf_counter,
        set_threads: Callable[[int], None] = torch.set_num_threads,
        others: Callable[[], OtherLoad | None] = read_other_load,
        cores: int | None = None,
    ) -> None:
        if not candidates:
            raise ValueError("no thread counts to choose from")
        self.candidates = candidates
        self._probe_steps = probe_steps
        self._recheck_s = recheck_s
        self._clock = clock
        self._set_threads = set_threads
        self._probing: int | None = 0  # index of the count being timed; None: holding
        self._timed: list[float] = []
        self._step_s: dict[int, float] = {}
        # The pass that fewer threads won, while the counts are timed again (see _choose).
        self._first_pass: dict[int, float] | None = None
        self._held_s = 0.0  # seconds of steps trained at the held count since it was chosen
        self._chosen_s = float("inf")  # the held count's step time when it was chosen
        if len(candidates) == 1:  # one core: nothing to choose, ever
            self._probing, self._held_s = None, float("-inf")
        self._last: float | None = None
        self._untimed = 0  # steps in a row beside the worker's writes
        # Holding fewer threads than the most: whether the cores are watched, the clock and other
        # processes' load at the last reading (None: none yet), when the next reading is due,
        # the wait after the last choice (no timing before its end) and its length.
        self._others = others
        self._cores = usable_cores() if cores is None else cores
        self._watching = False
        self._watch: tuple[float, OtherLoad] | None = None
        self._read_at = 0.0
        self._look_at = 0.0
        self._wait_s = LOOK_AFTER_S
        # Others' use of the cores, in cores, over the last stretch judged (None: none, or the
        # last was too long to judge), and that use when more threads last lost a look.
        self._used: float | None = None
        self._lost_used: float | None = None
        # The count held when the counts began to be timed again (None: the first timing), for
        # the wait after the choice: it doubles when that count is chosen again.
        self._timed_from: int | None = None
        # Seconds of steps it had held for when a slow-down set the timing off (else infinite).
        self._timed_after_s = float("inf")
        self.threads = candidates[0]
        set_threads(self.threads)

    def step(self, *, beside_writes: bool = False) -> None:
        """One training step has just ended; ``beside_writes``: the worker's writing threads
        worked during it (not timed, up to :data:`MAX_UNTIMED_STEPS` in a row)."""
        if not beside_writes:
            self._untimed = 0
        elif self._untimed < MAX_UNTIMED_STEPS:  # past it, all are timed until a quiet one
            self._untimed += 1
            self.resume_timing()
            return
        now = self._clock()
        if self._probing is None:
            changed = self._changed(now)
            slowed = changed is not None and changed > self._chosen_s
            if changed is not None and self._may_time_again(now, slower=slowed):
                # What the held count does now is known: time only the others.
                self._timed_from = self.threads
                self._timed_after_s = self._held_s if slowed else float("inf")
                self._step_s = {self.threads: changed}
                self._probe_next(-1)
                return
            if self._held_s >= self._recheck_s or self._look_due(now):
                self._timed_from, self._timed_after_s = self.threads, float("inf")
                self._probe_next(-1)
                return
        elif self._last is not None:
            self._timed.append(now - self._last)
            if len(self._timed) >= self._probe_steps or self._hopeless():
                self._step_s[self.threads] = typical_step_s(self._timed)
                self._probe_next(self._probing)
                return
        self._last = self._clock()

    def _changed(self, now: float) -> float | None:
        """The held count's recent step time if it runs well slower than when it was chosen
        (another process took a core), or well faster while it is not the most threads (the
        process that took a core let go of it), else None."""
        if self._last is None:
            return None
        self._timed.append(now - self._last)
        self._held_s += now - self._last
        if len(self._timed) < self._probe_steps:
            return None
        recent = typical_step_s(self._timed)
        self._timed = []
        if recent > self._chosen_s * SLOWDOWN_FACTOR:
            return recent
        if recent * SPEEDUP_FACTOR < self._chosen_s and self.threads < self.candidates[-1]:
            return recent
        return None

    def _may_time_again(self, now: float, *, slower: bool) -> bool:
        """Whether the held count's change of speed may time the counts now: at once where it
        holds the most threads, or slowed with fewer left to try (fewer may win now; a wait
        would only cost); else not before the wait after the last choice."""
        if self.threads == self.candidates[-1] or (slower and self.threads > self.candidates[0]):
            return True
        return now >= self._look_at

    def _look_due(self, now: float) -> bool:
        """Whether, holding fewer threads than the most, the cores the next count up would add
        sat idle over the last reading's stretch and none is taken now, and the wait after the
        last choice is over or the load went (:meth:`_lifted`): time the counts again."""
        if not self._watching or now < self._read_at:
            return False
        reading = self._others()
        self._read_at = now + LOOK_AFTER_S
        if reading is None:  # the file could not be read this time: keep the last reading
            return False
        last, self._watch = self._watch, (now, reading)
        if last is None or now - last[0] > MAX_STRETCH_S:
            self._used = None
            return False  # judged over the next stretch, not over the worker's idle minutes
        since, before = last
        beyond = self._cores - self.threads
        used = (reading.cpu_s - before.cpu_s) / (now - since)
        spare = beyond - used
        if spare > beyond + IMPLAUSIBLE_CORES:
            self._watching = False
            return False
        self._used = used
        more = next(n for n in self.candidates if n > self.threads) - self.threads
        free_now = beyond - reading.runnable
        if spare < more - 1 + SPARE_CORE or free_now < more:
            return False
        if now < self._look_at and not self._lifted(used):
            return False
        log.debug(
            "torch threads: %.2f of the %d cores beyond %d idle over %.2f s, %d free now: "
            "timing the counts again",
            spare,
            beyond,
            self.threads,
            now - since,
            free_now,
        )
        return True

    def _lifted(self, used: float) -> bool:
        """Whether other processes' use of the cores fell well below what it was when more
        threads last lost a look (``LIFTED_SHARE``, ``LIFTED_CORES``): the load that kept fewer
        threads went, and the look need not wait."""
        lost = self._lost_used
        return lost is not None and used <= lost * LIFTED_SHARE and lost - used >= LIFTED_CORES

    def _hopeless(self) -> bool:
        """Whether the count being timed already runs far slower than the fastest timed."""
        if len(self._timed) < ABANDON_AFTER or not self._step_s:
            return False
        return typical_step_s(self._timed) > ABANDON_FACTOR * min(self._step_s.values())

    def _probe_next(self, after: int) -> None:
        """Time the next candidate after index ``after`` not timed yet; choose when none is left."""
        for index in range(after + 1, len(self.candidates)):
            if self.candidates[index] not in self._step_s:
                self._probe(index)
                return
        self._choose()

    def resume_timing(self) -> None:
        """Training steps resume now: the time since the last step is not one."""
        self._last = self._clock()

    def begin(self) -> None:
        """A job's or an epoch's steps begin: the tuner's count applies (whatever else in the
        process set torch's since), and timing resumes."""
        self._set_threads(self.threads)
        self.resume_timing()

    def _probe(self, index: int) -> None:
        self._probing = index
        self._timed = []
        self._switch(self.candidates[index])
        self._last = None  # the first step at a new count warms its threads up: not timed

    def _choose(self) -> None:
        fastest = min(self._step_s, key=self._step_s.__getitem__)
        most = self._step_s.get(self.candidates[-1], float("inf"))
        narrowly = fastest != self.candidates[-1] and most <= ABANDON_FACTOR * self._step_s[fastest]
        if narrowly and self._first_pass is None:
            # Fewer threads won, and not by the margin of a load that takes a core: time every
            # count once more before holding them for RECHECK_S. A transient in the more
            # threads' window (a core's vCPU waking after the worker idled, another process's
            # burst) made them lose a single pass while two ran faster: one thread then held
            # for the next ~14 jobs, 25% slower each.
            self._first_pass, self._step_s = self._step_s, {}
            self._probe_next(-1)
            return
        if self._first_pass is not None:
            # Each count's faster pass: a transient slows one window, a load that lasts (an
            # API answering polls) slows both.
            first, self._first_pass = self._first_pass, None
            self._step_s = {n: min(s, first.get(n, s)) for n, s in self._step_s.items()}
            fastest = min(self._step_s, key=self._step_s.__getitem__)
        log.debug(
            "torch threads: %s",
            ", ".join(f"{n}: {s * 1e6:.0f} µs/step" for n, s in sorted(self._step_s.items())),
        )
        self._probing = None
        self._chosen_s = self._step_s[fastest]
        self._step_s = {}
        self._timed = []
        self._switch(fastest)
        self._held_s = 0.0
        self._last = self._clock()
        self._watch_cores()

    def _watch_cores(self) -> None:
        """After a choice: watch the cores that fewer threads than the most leave. When more
        threads lost once more (the count held before is held again, or the most threads held
        only briefly before losing), the next timing waits twice as long: a load that stays
        would make each cost. A new count waits least: the load that chose it may pass soon."""
        timed_from, self._timed_from = self._timed_from, None
        most = self.candidates[-1]
        self._watching = self.threads < most
        if not self._watching:  # the wait stays: the most may lose again at once
            self._watch = None
            return
        if timed_from == self.threads:  # (the use over the last stretch: what made them lose)
            self._wait_s, self._lost_used = min(2 * self._wait_s, MAX_LOOK_WAIT_S), self._used
        elif timed_from == most and self._timed_after_s < MAX_LOOK_WAIT_S:
            # The most threads slowed soon after they won: the load they won in a quiet moment
            # of stays, and so does the use it was last read at (nothing is read meanwhile).
            self._wait_s = min(2 * self._wait_s, MAX_LOOK_WAIT_S)
        else:
            self._wait_s = LOOK_AFTER_S
        reading, now = self._others(), self._clock()
        self._watch = None if reading is None else (now, reading)  # None: read at the look
        self._read_at, self._look_at = now + LOOK_AFTER_S, now + self._wait_s

    def _switch(self, threads: int) -> None:
        if threads != self.threads:
            self._set_threads(threads)
            self.threads = threads


@functools.cache
def process_tuner() -> ThreadTuner:
    """The tuner of this process: the thread count is the process's, whatever job it trains.

    It chooses only among counts that train to the same bits (:func:`same_bits_counts`).
    """
    return ThreadTuner(same_bits_counts(candidate_threads(usable_cores())))
