"""Watching a job from a terminal: the tutorial's tqdm bar per epoch, fed by its events.

Steps reach the client in batches: the worker flushes a few times a second, and a stream that
catches up (a watch that starts late, a reconnection) sends up to a thousand at once. When a
batch arrives says little about when its steps ran, so tqdm's own clock (the time between two
``update`` calls) would show rates of millions of steps a second. The bars count the true
steps and take their elapsed time and rate from the job's own timeline instead
(:class:`Timeline`).
"""

from __future__ import annotations

import itertools
import time
from bisect import bisect_left
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO

from tqdm import tqdm

from service.cli.client import Client

Clock = Callable[[], float]  # seconds since the epoch, as time.time


def _timestamp(iso: str | None) -> float | None:
    if not iso:
        return None
    moment = datetime.fromisoformat(iso)
    if moment.tzinfo is None:  # the API writes UTC
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


class Timeline:
    """When the steps of the job's current attempt ran, as far as the job tells: known points
    ``(step, time)``, with the steps between two points spread evenly over the time between.

    The points: the attempt's start (``started_at``: step 0, or for a retried attempt that
    resumed, no step the client can place); where the job stood when the watch learnt of the
    attempt (its step, at ``finished_at`` or now); and every batch that brings steps newer
    than that (a live batch: its last step ran within the last flush, so now).
    """

    def __init__(self) -> None:
        self.points: list[tuple[int, float]] = []

    def start(self, job: dict[str, Any], now: float) -> None:
        """A new attempt (or the first status seen): place what the job says."""
        self.points = []
        started = _timestamp(job.get("started_at"))
        if started is None:  # queued: nothing has run
            return
        started = min(started, now)  # a server clock ahead of ours
        if job["attempt"] <= 1:
            self.points.append((0, started))
        finished = _timestamp(job.get("finished_at"))
        at = now if finished is None else min(max(finished, started), now)
        if job["step"] > 0 or not self.points:
            self.points.append((job["step"], at))

    def saw(self, step: int, now: float) -> None:
        """A batch ending at ``step`` arrived; newer than any point, it ran just now."""
        if self.points and step > self.points[-1][0]:
            self.points.append((step, max(now, self.points[-1][1])))

    def time_of(self, step: int) -> float | None:
        """When ``step`` ended (None: before the first point, or no point yet)."""
        if not self.points or step < self.points[0][0]:
            return None
        i = bisect_left(self.points, step, key=lambda p: p[0])
        if i == len(self.points):
            return self.points[-1][1]
        s1, t1 = self.points[i]
        if s1 == step or i == 0:
            return t1
        s0, t0 = self.points[i - 1]
        return t0 + (t1 - t0) * (step - s0) / (s1 - s0)

    def span(self, first: int, last: int) -> tuple[float, float | None]:
        """Elapsed seconds and steps per second from step ``first`` to ``last`` (the part of
        it the timeline can place); ``(0, None)`` when it cannot place any."""
        if self.points:
            first = max(first, self.points[0][0])
        begin, end = self.time_of(first), self.time_of(last)
        if begin is None or end is None or last <= first or end <= begin:
            return 0.0, None
        return end - begin, (last - first) / (end - begin)


class StepBar(tqdm):  # type: ignore[misc]
    """A tqdm bar whose elapsed time and rate are set from the job's timeline, not measured
    between our ``update`` calls (tqdm's documented way: override ``format_dict``)."""

    true_elapsed: float = 0.0
    true_rate: float | None = None

    @property
    def format_dict(self) -> dict[str, Any]:
        """tqdm's values for drawing the bar, with the job's elapsed time and rate."""
        values = dict(super().format_dict)
        values["elapsed"], values["rate"] = self.true_elapsed, self.true_rate
        return values


class EpochBars:
    """The tutorial's tqdm bar per epoch, fed by a job's events; loss and accuracy as postfix."""

    def __init__(self, out: TextIO, clock: Clock = time.time) -> None:
        self.out = out
        self.clock = clock
        self.bar: StepBar | None = None
        self.job: dict[str, Any] = {}
        self.timeline = Timeline()
        self.loss: float | None = None
        self.accuracy: float | None = None  # the open bar's epoch's, once it has one
        self.epoch_done = 0  # epochs finished, so the open bar is epoch_done + 1

    def _open(self) -> StepBar:
        if self.bar is None:
            epochs = self.job["params"]["epochs"]
            self.bar = StepBar(
                total=self.job["steps_per_epoch"],
                desc=f"epoch {self.epoch_done + 1}/{epochs}",
                unit="step",
                file=self.out,
                dynamic_ncols=True,
                leave=True,
            )
            self.accuracy = None  # the previous epoch's is not this one's
        return self.bar

    def _postfix(self, bar: StepBar) -> None:
        postfix = {"loss": f"{self.loss:.4f}" if self.loss is not None else "-"}
        if self.accuracy is not None:
            postfix["acc"] = f"{self.accuracy:.4f}"
        bar.set_postfix(postfix, refresh=True)

    def _time(self, bar: StepBar, last_step: int) -> None:
        first = self.epoch_done * self.job["steps_per_epoch"]
        bar.true_elapsed, bar.true_rate = self.timeline.span(first, last_step)

    def status(self, job: dict[str, Any]) -> None:
        """A status event: a new attempt starts the bars over; only a retry (attempt 2 and
        on) is announced, the first claim of a queued job is no news."""
        if not self.job or job["attempt"] != self.job["attempt"]:
            if self.job:
                self.close()
                self.epoch_done, self.loss, self.accuracy = 0, None, None
            if self.job and job["attempt"] > 1:
                where = f"from epoch {job['epoch'] + 1}" if job["epoch"] else "from the start"
                self.out.write(
                    f"attempt {job['attempt']} of {job['max_attempts']}: "
                    f"the job is retried {where}\n"
                )
            self.timeline.start(job, self.clock())
        self.job = job

    def steps(self, steps: list[dict[str, Any]]) -> None:
        """A batch of steps: advance the bars, the true count at the job's true rate."""
        if not steps:
            return
        self.timeline.saw(steps[-1]["step"], self.clock())
        for epoch, group in itertools.groupby(steps, key=lambda s: s["epoch"]):
            chunk = list(group)
            # Steps of a later epoch (its accuracy not recorded yet) go to that epoch's bar.
            while epoch > self.epoch_done + 1:
                self.close()
                self.epoch_done += 1
            bar = self._open()
            self.loss = chunk[-1]["loss"]
            self._time(bar, chunk[-1]["step"])
            bar.update(len(chunk))
            self._postfix(bar)

    def epoch(self, epoch: dict[str, Any]) -> None:
        """An epoch's accuracy: shown on its bar, which then closes."""
        bar = self._open()
        self.accuracy = epoch["accuracy"]
        if bar.total and bar.n < bar.total:
            bar.update(bar.total - bar.n)
        self._postfix(bar)
        self.close()
        self.epoch_done = epoch["epoch"]

    def close(self) -> None:
        """Close the open bar."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def watch(client: Client, job_id: str, out: TextIO, clock: Clock = time.time) -> dict[str, Any]:
    """Follow a job's events with epoch bars; returns the job as it ended."""
    bars = EpochBars(out, clock)
    final: dict[str, Any] = {}
    try:
        for event in client.events(job_id):
            data = event.json()
            if event.event == "status":
                bars.status(data)
                final = data
            elif event.event == "step":
                bars.steps(data["steps"])
            elif event.event == "epoch":
                bars.epoch(data)
    finally:
        bars.close()
    return final
