"""What the same polls take from each thread count the worker may train at, all counts timed
within one loop of training steps, left alone and polled.

The metrics section's jobs say what 200 polls a second cost the default worker. This says
whether any count could have done better on this machine, which the jobs cannot: a job at one
thread and a job at two run minutes apart, and this host's speed drifts by more than their
difference within minutes. Here the counts alternate every :data:`BLOCK_STEPS` steps of one
loop (the worker's own step, :func:`workers.training.train.train_step`), so that both meet the
same moment of the machine. A count's time is its mean step, not a trimmed one: under polls a
few steps at two threads stall for many times their length, and those stalls are the polls'
cost (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from benchmarks.floor import CPU, floor_threads, thread_count
from benchmarks.polled_jobs import POLL_RATE_HZ, POLLERS
from benchmarks.series_clients import Poller
from benchmarks.stats import fmt
from service.ml import SimpleMLP
from service.schemas import JobCreate
from workers.data import Mnist
from workers.training.train import make_optimizer, train_step

BLOCK_STEPS = 16  # steps at one count before the next; the first of each is not timed
POLLERS_START_S = 0.05  # for wrk's processes to connect and send their first polls


@dataclass
class PollsRun:
    """What the pollers did while a loop ran: filled in when they stop."""

    answered: int = 0
    rate_hz: float = 0.0


@contextlib.contextmanager
def polling(url: str, job_id: str) -> Iterator[PollsRun]:
    """The metrics section's pollers (:class:`benchmarks.series_clients.Poller`, at its rate
    and connections) asking ``url`` for ``job_id``'s steps, for as long as the block runs; how
    many they had answered is read when it ends (a refused or failed poll raises)."""
    run = PollsRun()
    with Poller(url, job_id, POLL_RATE_HZ, POLLERS) as poller:
        time.sleep(POLLERS_START_S)
        yield run
        run.answered = poller.stop()
        run.rate_hz = poller.rate_hz


@dataclass
class CountsRound:
    """One round: each count's step times (seconds), in the loop left alone and polled."""

    quiet: dict[int, list[float]]
    polled: dict[int, list[float]]
    polls_hz: float  # the pollers' rate over the polled loop

    def mean_s(self, threads: int, *, polled: bool) -> float:
        """A count's mean step in this round, polled or left alone."""
        return statistics.fmean((self.polled if polled else self.quiet)[threads])

    def slowdown(self, threads: int) -> float:
        """How much longer a count's steps took polled than left alone in this round, less one."""
        return self.mean_s(threads, polled=True) / self.mean_s(threads, polled=False) - 1

    def fastest(self, *, polled: bool) -> int:
        """The count whose steps were fastest in this round, polled or left alone."""
        return min(self.quiet, key=lambda n: self.mean_s(n, polled=polled))

    @property
    def least(self) -> float:
        """The fastest count's polled steps against the fastest count's left alone, less one:
        the least the polls cost a loop that chose its count well, this round (the goal holds
        a polled job to the default left alone, not to the same count's)."""
        polled = self.mean_s(self.fastest(polled=True), polled=True)
        return polled / self.mean_s(self.fastest(polled=False), polled=False) - 1


class Least(NamedTuple):
    """The least the polls cost over the rounds, and which count was fastest under them."""

    slowdown: float  # the median of the rounds' own
    per_round: list[float]
    fastest_polled: Counter[int]  # rounds in which each count's polled steps were fastest


@dataclass
class CountsUnderPolls:
    """Rounds of each count's steps left alone and polled, by one polled server. Every figure
    is the median over the rounds of the round's own, so that a round the machine slowed
    throughout (this host does, now and then, for seconds) does not decide."""

    label: str
    rounds: list[CountsRound] = field(default_factory=list)

    @property
    def counts(self) -> list[int]:
        """The thread counts timed."""
        return list(self.rounds[0].quiet) if self.rounds else []

    def mean_s(self, threads: int, *, polled: bool) -> float:
        """A count's mean step, polled or left alone."""
        return statistics.median(r.mean_s(threads, polled=polled) for r in self.rounds)

    def slowdown(self, threads: int) -> float:
        """How much longer a count's steps take polled than left alone, less one."""
        return statistics.median(r.slowdown(threads) for r in self.rounds)

    @property
    def polls_hz(self) -> float:
        """The pollers' rate over the polled loops."""
        return statistics.median(r.polls_hz for r in self.rounds)

    @property
    def least(self) -> Least:
        """The least the polls cost a loop that chose its count well."""
        per_round = [r.least for r in self.rounds]
        fastest = Counter(r.fastest(polled=True) for r in self.rounds)
        return Least(statistics.median(per_round), per_round, fastest)


def timed_steps(
    data: Mnist, params: JobCreate, counts: tuple[int, ...], *, seed: int
) -> dict[int, list[float]]:
    """One job's training steps (``params``: its epochs of shuffled batches, no evaluation),
    the thread count changing every :data:`BLOCK_STEPS` steps; each count's step times. Only
    full batches are timed, and not an epoch's first step (its shuffle) nor a count's first
    (its threads wake up): those fall on the same count in every round, and would weigh on it
    alone. torch's thread count is left at the last block's."""
    n, batch_size = params.trainset_size, params.batch_size
    trainset = data.train.first(n, "trainset_size")
    torch.manual_seed(seed)
    shuffle = torch.Generator().manual_seed(seed)
    model = SimpleMLP()
    optimizer = make_optimizer(model, params.learning_rate, CPU)
    times: dict[int, list[float]] = {c: [] for c in counts}
    step = 0
    for _epoch in range(params.epochs):
        order = torch.randperm(n, generator=shuffle)
        last: float | None = None
        for start in range(0, n, batch_size):
            if step % BLOCK_STEPS == 0:
                threads = counts[step // BLOCK_STEPS % len(counts)]
                torch.set_num_threads(threads)
                last = None
            batch = order[start : start + batch_size]
            train_step(model, optimizer, trainset.images[batch], trainset.labels[batch])
            now = time.perf_counter()
            if last is not None and len(batch) == batch_size:
                times[threads].append(now - last)
            last, step = now, step + 1
    return times


def counts_under_polls(
    data: Mnist,
    polls: Callable[[], AbstractContextManager[PollsRun]],
    *,
    rounds: int,
    label: str,
    params: JobCreate | None = None,
    counts: tuple[int, ...] | None = None,
) -> CountsUnderPolls:
    """``rounds`` rounds of one job's steps (``params``, the default job's if None) left alone
    and one polled (``polls()`` polls for as long as its block runs), in alternating order;
    ``counts``: the floor's (:func:`benchmarks.floor.floor_threads`)."""
    params = params or JobCreate()
    counts = counts or floor_threads()
    result = CountsUnderPolls(label)
    threads = torch.get_num_threads()
    try:
        for r in range(rounds):
            quiet_first = r % 2 == 0
            if quiet_first:
                quiet = timed_steps(data, params, counts, seed=r)
            with polls() as run:
                polled = timed_steps(data, params, counts, seed=r)
            if not quiet_first:
                quiet = timed_steps(data, params, counts, seed=r)
            if run.answered == 0:
                raise RuntimeError(f"no poll was answered while the loop ran ({label})")
            result.rounds.append(CountsRound(quiet, polled, run.rate_hz))
            print(
                f"  metrics round {r + 1}/{rounds} ({label}): "
                + ", ".join(
                    f"{thread_count(c)} {result.rounds[-1].slowdown(c):+.1%}" for c in counts
                ),
                file=sys.stderr,
                flush=True,
            )
    finally:
        torch.set_num_threads(threads)
    return result


def count_rows(results: list[CountsUnderPolls]) -> list[list[str]]:
    """The table's rows: each count's mean step left alone and polled, and its slowdown, per
    polled server."""
    return [
        [
            result.label,
            thread_count(c),
            fmt(result.mean_s(c, polled=False) * 1e6, "µs"),
            fmt(result.mean_s(c, polled=True) * 1e6, "µs"),
            f"{result.slowdown(c):+.1%}",
            fmt(result.polls_hz),
        ]
        for result in results
        for c in result.counts
    ]


def least_text(result: CountsUnderPolls) -> str:
    """The least the polls cost, in words: "+17.6% (fastest under the polls: 2 threads in 5 of
    7 rounds)"."""
    least = result.least
    fastest = ", ".join(
        f"{thread_count(c)} in {n} of {len(result.rounds)} rounds"
        for c, n in least.fastest_polled.most_common()
    )
    return f"{least.slowdown:+.1%} (fastest under the polls: {fastest})"
