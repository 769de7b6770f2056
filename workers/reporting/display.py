"""What a person watching a worker sees: a tqdm bar per epoch, or one log line per epoch."""

from __future__ import annotations

import logging
import math
import sys
from typing import Any

from tqdm import tqdm

log = logging.getLogger("workers")


class ProgressDisplay:
    """A tqdm bar per epoch when ``show_bar``; else (JSON logs) a log line at each epoch's end."""

    def __init__(self, *, job_id: str, epochs: int, steps_per_epoch: int, show_bar: bool) -> None:
        self._job_id = job_id
        self._epochs = epochs
        self._steps_per_epoch = steps_per_epoch
        self._show_bar = show_bar
        self._bar: tqdm[Any] | None = None

    def step_taken(self, epoch_done: int) -> None:
        """A step of epoch ``epoch_done + 1`` was taken: open its bar if there is none."""
        if self._bar is None and self._show_bar:
            self._bar = tqdm(
                total=self._steps_per_epoch,
                desc=f"job {self._job_id[:8]} epoch {epoch_done + 1}/{self._epochs}",
                file=sys.stderr,
                unit="step",
                dynamic_ncols=True,
            )

    def flushed(self, new_steps: int, loss: float | None, accuracy: float | None) -> None:
        """Steps were written: move the bar and show the latest loss and accuracy."""
        if self._bar is None:
            return
        self._bar.update(new_steps)
        postfix: dict[str, str] = {}
        if loss is not None:
            postfix["loss"] = f"{loss:.4f}"
        if accuracy is not None:
            postfix["acc"] = f"{accuracy:.4f}"
        self._bar.set_postfix(postfix, refresh=False)

    def epoch_done(self, epoch: int, loss: float | None, accuracy: float) -> None:
        """Close the epoch's bar, or log its line when there is no bar."""
        if self._bar is not None:
            self.close()
        elif not self._show_bar:
            log.info(
                "epoch %d/%d: loss %.4f, test accuracy %.4f",
                epoch,
                self._epochs,
                loss if loss is not None else math.nan,
                accuracy,
                extra={"epoch": epoch, "loss": loss, "accuracy": accuracy},
            )

    def close(self) -> None:
        """Close the bar, if one is open."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
