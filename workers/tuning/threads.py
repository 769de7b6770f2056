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
are timed again once other processes leave the next count's cores idle (``SPARE_CORE``).
Intervals that hold anything but training steps (a flush, an evaluation, a checkpoint) are not
timed, nor are steps that ran beside the worker's own flushes and training states (they stall
any count, and only for the write's milliseconds). A count's
mean step time stands for it, without its slowest few steps, so a stray slow step does not
decide it; a median would not do: a process that takes a core now and then (an API answering 200
polls a second) stalls one step in several at two threads, and those stalls are the cost. While
a count holds, its steps are still timed: when they run well slower than when it was chosen, the
counts are timed again, and so they are when fewer threads than the most run well faster (the
load that chose them lifted).

A switch of count mid-job must not change what a seeded job records. Matrix products split
their sums across threads, and by default MKL splits them differently at different counts,
so the losses drift apart within a few steps. Importing :mod:`service` turns on MKL's strict
reproducible mode, in which they do not; and the process's tuner only chooses among the
counts whose training steps give one thread's bits, checked when it is made (no MKL, a CPU
without AVX2, or a mode set otherwise leaves it one thread).
"""

from __future__ import annotations

import functools
import logging
import os
import statistics
import time
from collections.abc import Callable
from typing import Literal

import torch

from service.ml import IMAGE_SIDE_PX, NUM_CLASSES, SimpleMLP
from workers.training.train import make_optimizer, train_step
from workers.tuning.other_load import OtherLoad, read_other_load

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
SAME_BITS_BATCHES = (64, 1024)  # the default batch and a large one...
SAME_BITS_STEPS = 2  # ...each trained this many steps (the second uses Adam's moments)
# Steps beside the worker's own writes are not timed (:meth:`ThreadTuner.step`), but no more
# than this many in a row: a write that hangs (a database gone quiet) must not freeze the choice.
MAX_UNTIMED_STEPS = 4 * PROBE_STEPS
# Holding fewer threads than the most, the counts are timed again once the cores that the next
# count up would add sat idle, as other processes used them: over the last reading's stretch
# (readings at most every LOOK_AFTER_S of the clock, a stretch of at most MAX_STRETCH_S) no
# more than SPARE_CORE of them in use on average, and none of them taken by a runnable task at
# the reading (a load that began late in the stretch). One thread's own steps hardly slow beside
# a load, so they cannot tell that it has gone: one thread chosen while a job was watched held
# for RECHECK_S of steps after its watchers left. Timing the counts at each job's start instead
# cost up to 40% of a job beside a load that lasts (docs/benchmarks.md). Each look that fewer
# threads win again doubles the wait for the next, up to RECHECK_S (a load that takes a little
# of a core and still makes two threads lose: an API answering polls); choosing the most
# threads, or a choice after the held count slowed (a load came), starts it at LOOK_AFTER_S.
LOOK_AFTER_S = 0.2
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
        # processes' load at the last reading (None: none yet), when the next may decide, and
        # how long it waits then.
        self._others = others
        self._cores = usable_cores() if cores is None else cores
        self._watching = False
        self._watch: tuple[float, OtherLoad] | None = None
        self._look_at = 0.0
        self._wait_s = LOOK_AFTER_S
        # Why the counts are being timed, for the wait after the choice: the cores sat idle
        # (it doubles), the held count slowed (it starts again), neither (it stays).
        self._timing_for: Literal["idle cores", "a load"] | None = None
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
            if changed is not None:
                # What the held count does now is known: time only the others.
                self._timing_for = "a load" if changed > self._chosen_s else None
                self._step_s = {self.threads: changed}
                self._probe_next(-1)
                return
            if self._held_s >= self._recheck_s:
                self._timing_for = None
                self._probe_next(-1)
                return
            if self._look_due(now):
                self._timing_for = "idle cores"
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

    def _look_due(self, now: float) -> bool:
        """Whether, holding fewer threads than the most, the cores the next count up would add
        sat idle over the last reading's stretch and none is taken now: time the counts again."""
        if not self._watching or now < self._look_at:
            return False
        reading = self._others()
        self._look_at = now + LOOK_AFTER_S
        if reading is None:  # the file could not be read this time: keep the last reading
            return False
        last, self._watch = self._watch, (now, reading)
        if last is None or now - last[0] > MAX_STRETCH_S:
            return False  # judged over the next stretch, not over the worker's idle minutes
        since, before = last
        beyond = self._cores - self.threads
        spare = beyond - (reading.cpu_s - before.cpu_s) / (now - since)
        if spare > beyond + IMPLAUSIBLE_CORES:
            self._watching = False
            return False
        more = next(n for n in self.candidates if n > self.threads) - self.threads
        free_now = beyond - reading.runnable
        if spare < more - 1 + SPARE_CORE or free_now < more:
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
        """After a choice: watch the cores that fewer threads than the most leave. A look at
        idle cores that fewer threads won again waits twice as long for the next (the load
        that stays would make each look cost), a choice after a load came waits least (it may
        pass soon)."""
        timing_for, self._timing_for = self._timing_for, None
        self._watching = self.threads < self.candidates[-1]
        if not self._watching:
            self._watch, self._wait_s = None, LOOK_AFTER_S
            return
        if timing_for == "idle cores":
            self._wait_s = min(2 * self._wait_s, max(self._recheck_s, LOOK_AFTER_S))
        elif timing_for == "a load":
            self._wait_s = LOOK_AFTER_S
        reading, now = self._others(), self._clock()
        self._watch = None if reading is None else (now, reading)  # None: read at the look
        self._look_at = now + self._wait_s

    def _switch(self, threads: int) -> None:
        if threads != self.threads:
            self._set_threads(threads)
            self.threads = threads


def training_bits(batch_size: int) -> list[torch.Tensor]:
    """The losses and the parameters after a few seeded training steps on random images, at
    the current thread count (the global random state is left as it was)."""
    cpu = torch.device("cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SimpleMLP()
        optimizer = make_optimizer(model, 1e-3, cpu)
        images = torch.randn(batch_size, 1, IMAGE_SIDE_PX, IMAGE_SIDE_PX)
        labels = torch.randint(0, NUM_CLASSES, (batch_size,))
        losses = [train_step(model, optimizer, images, labels) for _ in range(SAME_BITS_STEPS)]
    return [*losses, *(p.detach() for p in model.parameters())]


def same_bits_counts(candidates: tuple[int, ...]) -> tuple[int, ...]:
    """The first candidate and those of the others at which training steps give its bits.

    A count outside them would make a seeded job's losses depend on when the tuner switched.
    """
    before = torch.get_num_threads()

    def bits_at(threads: int) -> list[list[torch.Tensor]]:
        torch.set_num_threads(threads)
        return [training_bits(batch_size) for batch_size in SAME_BITS_BATCHES]

    def same(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> bool:
        return all(
            torch.equal(x, y)
            for xs, ys in zip(a, b, strict=True)
            for x, y in zip(xs, ys, strict=True)
        )

    try:
        reference = bits_at(candidates[0])
        kept = (candidates[0], *(n for n in candidates[1:] if same(bits_at(n), reference)))
    finally:
        torch.set_num_threads(before)
    if kept != candidates:
        log.warning(
            "torch threads: %s give other results than %d (MKL_CBWR=%s): kept to %s so that "
            "seeded jobs repeat their losses",
            ", ".join(str(n) for n in candidates if n not in kept),
            candidates[0],
            os.environ.get("MKL_CBWR", ""),
            ", ".join(str(n) for n in kept),
        )
    return kept


@functools.cache
def process_tuner() -> ThreadTuner:
    """The tuner of this process: the thread count is the process's, whatever job it trains.

    It chooses only among counts that train to the same bits (:func:`same_bits_counts`).
    """
    return ThreadTuner(same_bits_counts(candidate_threads(usable_cores())))
