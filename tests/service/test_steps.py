"""The step arithmetic every part of the service asks (service.steps)."""

from __future__ import annotations

import math

import pytest

from service.schemas import JobCreate
from service.steps import StepPlan


def test_the_tutorial_job() -> None:
    plan = StepPlan.of(JobCreate())
    assert plan.steps_per_epoch == 157  # 10,000 images in batches of 64: the last one short
    assert plan.total_steps == 471
    assert plan.examples_seen(157) == 10_000
    assert plan.examples_seen(158) == 10_064
    assert plan.epoch_of(157) == 1 and plan.epoch_of(158) == 2


@pytest.mark.parametrize(
    ("n", "batch", "epochs"), [(64, 64, 2), (65, 64, 1), (1, 4096, 3), (60000, 7, 2)]
)
def test_every_step_is_placed_once(n: int, batch: int, epochs: int) -> None:
    plan = StepPlan(epochs=epochs, batch_size=batch, trainset_size=n)
    assert plan.steps_per_epoch == math.ceil(n / batch)
    rows = [plan.step_row(s, 0.5) for s in range(1, plan.total_steps + 1)]
    assert [r["epoch"] for r in rows].count(epochs) == plan.steps_per_epoch
    # examples_seen rises by a batch, or by the short last batch, and ends each epoch at n·epoch
    for epoch in range(1, epochs + 1):
        assert plan.examples_seen(plan.steps_before(epoch)) == n * epoch
        assert plan.epoch_row(epoch, 0.9)["examples_seen"] == n * epoch
    seen = [r["examples_seen"] for r in rows]
    assert all(0 < b - a <= batch for a, b in zip([0, *seen], seen, strict=False))
    assert plan.examples_seen(0) == 0
