"""A training report that keeps every loss and accuracy in memory, for tests of the loop."""

from __future__ import annotations

from pathlib import Path

import torch

from workers.resume import TrainingState


class Recorder:
    """What ``train`` reports: each step's loss (read at once) and each epoch's accuracy."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.accuracies: list[tuple[int, float]] = []

    def step(self, loss: torch.Tensor) -> None:
        """Keep the step's loss."""
        self.losses.append(float(loss))

    def epoch(self, epoch: int, accuracy: float, state: TrainingState) -> None:
        """Keep the epoch's accuracy and the state a resume would use."""
        self.accuracies.append((epoch, accuracy))
        self.state = state


class DiesAfterFirstEpoch(Recorder):
    """Saves the state after epoch 1 to ``path``, then dies as a killed worker would."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def epoch(self, epoch: int, accuracy: float, state: TrainingState) -> None:
        """Record, save, and stop the run."""
        super().epoch(epoch, accuracy, state)
        state.save(self.path, epoch)
        raise KeyboardInterrupt  # the worker dies here
