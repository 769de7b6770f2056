"""The epoch bars fed with events as the stream sends them: true counts, the job's own rates,
each epoch's own accuracy, and a retry announced only when there was one."""

from __future__ import annotations

import io
import re
from datetime import UTC, datetime
from typing import Any

from service.cli.watch import EpochBars, Timeline

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC).timestamp()
PER_EPOCH = 1000


class Clock:
    """A clock the test moves."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat()


def job(status: str, attempt: int, step: int = 0, epoch: int = 0, **times: float) -> dict[str, Any]:
    return {
        "status": status,
        "attempt": attempt,
        "max_attempts": 3,
        "step": step,
        "epoch": epoch,
        "params": {"epochs": 2},
        "steps_per_epoch": PER_EPOCH,
        "started_at": iso(times["started"]) if "started" in times else None,
        "finished_at": iso(times["finished"]) if "finished" in times else None,
    }


def steps(first: int, last: int) -> list[dict[str, Any]]:
    return [
        {"step": s, "epoch": (s - 1) // PER_EPOCH + 1, "loss": 2.0 / s, "examples_seen": 64 * s}
        for s in range(first, last + 1)
    ]


def frames(out: io.StringIO) -> list[str]:
    """Every state the bars were drawn in, in order."""
    return [frame.strip() for frame in re.split(r"[\r\n]", out.getvalue()) if frame.strip()]


def rates(drawn: list[str]) -> list[float]:
    return [float(rate) for rate in re.findall(r"([\d.]+)step/s", "\n".join(drawn))]


def test_live_batches_move_the_bar_at_the_jobs_rate() -> None:
    clock, out = Clock(T0), io.StringIO()
    bars = EpochBars(out, clock)
    bars.status(job("running", 1, started=T0))
    for last in range(25, 1001, 25):  # a flush every quarter second, 100 steps a second
        clock.now = T0 + last / 100
        bars.steps(steps(last - 24, last))
    bars.close()
    drawn = frames(out)
    assert drawn[-1].startswith("epoch 1/2") and "1000/1000" in drawn[-1]
    assert rates(drawn) and all(rate == 100.0 for rate in rates(drawn))


def test_a_catch_up_of_a_thousand_steps_at_once_shows_the_jobs_rate() -> None:
    clock, out = Clock(T0 + 10), io.StringIO()
    bars = EpochBars(out, clock)
    # Watching starts late: the job has trained 1,000 steps in its first ten seconds, and
    # the stream sends them in two events, a moment apart.
    bars.status(job("running", 1, step=1000, started=T0))
    bars.steps(steps(1, 500))
    clock.now += 0.001
    bars.steps(steps(501, 1000))
    bars.close()
    drawn = frames(out)
    assert "1000/1000" in drawn[-1] and "00:10" in drawn[-1]
    assert rates(drawn) and all(rate == 100.0 for rate in rates(drawn))


def test_a_finished_job_watched_late_gets_its_true_rate_and_each_epoch_its_own_accuracy() -> None:
    clock, out = Clock(T0 + 3600), io.StringIO()
    bars = EpochBars(out, clock)
    bars.status(job("succeeded", 1, step=2000, epoch=2, started=T0, finished=T0 + 40))
    for first in (1, 1001):  # the stream's catch-up: 1,000 steps an event
        bars.steps(steps(first, first + PER_EPOCH - 1)[:400])
        bars.steps(steps(first + 400, first + PER_EPOCH - 1))
        bars.epoch({"epoch": first // PER_EPOCH + 1, "accuracy": 0.9 if first == 1 else 0.95})
    drawn = frames(out)
    assert all(rate == 50.0 for rate in rates(drawn)) and len(rates(drawn)) >= 4
    second = [frame for frame in drawn if frame.startswith("epoch 2/2")]
    assert second and "acc=0.9000" not in "".join(second)
    assert "acc=0.9500" in second[-1] and "2000" not in second[-1]  # the bar counts its epoch
    assert "00:20" in second[-1]  # half the job's 40 s


def test_no_retry_is_announced_for_the_first_claim_but_a_retry_is() -> None:
    clock, out = Clock(T0), io.StringIO()
    bars = EpochBars(out, clock)
    bars.status(job("queued", 0))
    clock.now = T0 + 1
    bars.status(job("running", 1, started=T0 + 1))
    bars.steps(steps(1, 10))
    assert "attempt" not in out.getvalue()
    clock.now = T0 + 60
    bars.status(job("running", 2, step=PER_EPOCH, epoch=1, started=T0 + 59))
    assert "attempt 2 of 3: the job is retried from epoch 2" in out.getvalue()
    bars.close()


def test_the_timeline_places_only_what_it_knows() -> None:
    timeline = Timeline()
    timeline.start(job("running", 1, step=100, started=T0), now=T0 + 10)
    assert timeline.time_of(50) == T0 + 5
    timeline.saw(300, now=T0 + 20)
    assert timeline.span(100, 300) == (10.0, 20.0)
    # A retried attempt that resumed: the steps before where it stood are not placed.
    timeline.start(job("running", 2, step=1500, started=T0 + 100), now=T0 + 110)
    assert timeline.time_of(1000) is None
    assert timeline.span(1000, 1500) == (0.0, None)
    timeline.saw(1600, now=T0 + 120)
    assert timeline.span(1000, 1600) == (10.0, 10.0)
    # A queued job: nothing ran.
    timeline.start(job("queued", 0), now=T0)
    assert timeline.span(0, 10) == (0.0, None)
