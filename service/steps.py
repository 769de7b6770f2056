"""The step arithmetic of a job: how many optimiser steps, and where each one falls.

One home for it: the store (a job's ``total_steps``, a rewind to an epoch), the workers
(step rows, ``examples_seen``), the event stream and the tests all ask this module, so the
series a worker writes and the figures the API reports cannot drift apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol


class StepShape(Protocol):
    """Anything that carries a job's shape: ``JobCreate``, a ``jobs`` row."""

    @property
    def epochs(self) -> int: ...  # noqa: D102

    @property
    def batch_size(self) -> int: ...  # noqa: D102

    @property
    def trainset_size(self) -> int: ...  # noqa: D102


@dataclass(frozen=True)
class StepPlan:
    """The tutorial's schedule: ``ceil(trainset / batch)`` steps per epoch, the last batch short."""

    epochs: int
    batch_size: int
    trainset_size: int

    @classmethod
    def of(cls, shape: StepShape) -> StepPlan:
        """The plan of a job's parameters or of its row."""
        return cls(shape.epochs, shape.batch_size, shape.trainset_size)

    @property
    def steps_per_epoch(self) -> int:
        """Optimiser steps in one epoch."""
        return math.ceil(self.trainset_size / self.batch_size)

    @property
    def total_steps(self) -> int:
        """Optimiser steps of the whole job."""
        return self.steps_per_epoch * self.epochs

    def steps_before(self, epoch: int) -> int:
        """Steps taken once ``epoch`` epochs have finished."""
        return epoch * self.steps_per_epoch

    def epoch_of(self, step: int) -> int:
        """The epoch (from 1) that step ``step`` (from 1) belongs to."""
        return (step - 1) // self.steps_per_epoch + 1

    def examples_seen(self, step: int) -> int:
        """Training images processed once ``step`` steps are done (the tutorial plot's x axis)."""
        if step == 0:
            return 0
        full_epochs, in_epoch = divmod(step - 1, self.steps_per_epoch)
        n = self.trainset_size
        return full_epochs * n + min((in_epoch + 1) * self.batch_size, n)

    def step_row(self, step: int, loss: float) -> dict[str, float | int]:
        """The ``train_steps`` row of step ``step``."""
        return {
            "step": step,
            "epoch": self.epoch_of(step),
            "loss": loss,
            "examples_seen": self.examples_seen(step),
        }

    def epoch_row(self, epoch: int, accuracy: float) -> dict[str, float | int]:
        """The ``epoch_metrics`` row of finished epoch ``epoch``."""
        return {
            "epoch": epoch,
            "accuracy": accuracy,
            "examples_seen": self.examples_seen(self.steps_before(epoch)),
        }
