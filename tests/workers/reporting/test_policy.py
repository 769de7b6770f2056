"""When a worker stops a job on its own account (workers.reporting.policy)."""

from __future__ import annotations

import threading

import pytest

from service.errors import CancelRequested
from workers.reporting.policy import Limits, RuntimeLimitExceeded, Shutdown, StopPolicy


def _policy(stop: threading.Event, *, max_runtime_s: float | None = None) -> StopPolicy:
    limits = Limits(
        lease_s=30, flush_interval_s=0.25, max_runtime_s=max_runtime_s, shutdown_grace_s=5
    )
    return StopPolicy(job_id="j", limits=limits, stop=stop, clock=lambda: 100.0)


def test_nothing_stops_a_job_in_good_standing() -> None:
    _policy(threading.Event(), max_runtime_s=10).check(cancel_requested=False, now=105.0)


def test_cancel_comes_first() -> None:
    stop = threading.Event()
    stop.set()
    with pytest.raises(CancelRequested):
        _policy(stop, max_runtime_s=1).check(cancel_requested=True, now=200.0)


def test_the_runtime_limit() -> None:
    with pytest.raises(RuntimeLimitExceeded, match="max_runtime_s of 10 s"):
        _policy(threading.Event(), max_runtime_s=10).check(cancel_requested=False, now=110.5)


def test_a_shutdown_waits_for_the_epoch_then_for_its_grace() -> None:
    stop = threading.Event()
    policy = _policy(stop)
    stop.set()
    policy.check(cancel_requested=False, now=101.0)  # seen: the grace starts
    policy.check(cancel_requested=False, now=105.9)
    with pytest.raises(Shutdown, match="grace"):
        policy.check(cancel_requested=False, now=106.0)


def test_a_shutdown_at_an_epoch_end_keeps_the_epoch_but_not_after_the_last() -> None:
    stop = threading.Event()
    policy = _policy(stop)
    policy.at_epoch_end(1, 3)  # not asked to stop: goes on
    stop.set()
    with pytest.raises(Shutdown, match="resumes after this epoch"):
        policy.at_epoch_end(1, 3)
    policy.at_epoch_end(3, 3)  # the last epoch: the job finishes instead
