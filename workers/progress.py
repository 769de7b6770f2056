"""The training loop's reporter: buffers step losses on the device and flushes them in batches.

A flush (every ``flush_interval_s``, and at each epoch's end) is one fenced transaction: insert
the buffered steps, advance the job's progress, renew its lease, read ``cancel_requested``.
The loop itself never waits on the database or on the host between flushes.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sqlalchemy.orm import Session, sessionmaker
from tqdm import tqdm

from service import repository
from service.clock import utcnow
from service.errors import CancelRequested
from service.schemas import JobCreate
from workers.resume import TrainingState, resume_path
from workers.threads import ThreadTuner

log = logging.getLogger("workers")


class Shutdown(Exception):
    """The worker was asked to stop; the job goes back to the queue."""


class Diverged(Exception):
    """A step's loss was not finite; training cannot meaningfully go on."""


class RuntimeLimitExceeded(Exception):
    """The job ran longer than its ``max_runtime_s``."""


@dataclass(frozen=True)
class Claim:
    """The attempt a worker holds: every write it makes is fenced on these."""

    job_id: str
    attempt: int
    worker_id: str


@dataclass(frozen=True)
class Limits:
    """When a worker stops a job on its own account."""

    lease_s: float
    flush_interval_s: float
    max_runtime_s: float | None = None  # fail the job past this
    shutdown_grace_s: float = 30.0  # after a stop request, finish the epoch within this


class Reporter:
    """Turns the loop's ``step``/``epoch`` calls into database rows and a tqdm bar."""

    def __init__(
        self,
        *,
        claim: Claim,
        params: JobCreate,
        sessions: sessionmaker[Session],
        limits: Limits,
        stop: threading.Event,
        checkpoint_dir: Path,
        show_progress: bool = True,
        threads: ThreadTuner | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.claim = claim
        self._threads = threads  # told of every step, to time them
        self._timing = False
        self._params = params
        self._sessions = sessions
        self._limits = limits
        self._stop = stop
        self._checkpoint_dir = checkpoint_dir
        self._clock = clock
        self._show_progress = show_progress
        self.steps_per_epoch = math.ceil(params.trainset_size / params.batch_size)

        self._losses: list[torch.Tensor] = []
        self._step = 0  # steps taken
        self._flushed_step = 0  # steps written
        self._epoch = 0
        self._accuracy: float | None = None
        self._epoch_rows: list[dict[str, Any]] = []
        self._resume_file: str | None = None
        self._started = clock()
        self._stop_seen_at: float | None = None
        self._next_flush = self._started + limits.flush_interval_s
        self.last_renewal = self._started
        self.flush_seconds = 0.0  # time spent in flushes: what persistence costs the job
        self._bar: tqdm[Any] | None = None
        self._last_loss: float | None = None

    def resume_at(self, epoch: int, accuracy: float | None) -> None:
        """Continue counting after ``epoch`` finished epochs (a resumed attempt)."""
        self._epoch = epoch
        self._step = self._flushed_step = epoch * self.steps_per_epoch
        self._accuracy = accuracy

    # --- called by the training loop ---------------------------------------------------------

    def step(self, loss: torch.Tensor) -> None:
        """Buffer one step's loss; flush when the interval has passed."""
        if self._bar is None and self._show_progress:
            self._open_bar()
        self._losses.append(loss)
        self._step += 1
        if self._threads is not None:
            # The first step of a job or an epoch follows setup or evaluation: not timed.
            if self._timing:
                self._threads.step()
            else:
                self._threads.begin()
                self._timing = True
        if self._clock() >= self._next_flush:
            self.flush()
            if self._threads is not None:
                self._threads.resume_timing()

    def epoch(self, epoch: int, accuracy: float, state: TrainingState) -> None:
        """Record an epoch's accuracy (and the state to resume from) and flush at once.

        A stop request waits for this point, so the job goes back to the queue with its
        finished epochs kept.
        """
        self._epoch = epoch
        self._accuracy = accuracy
        self._epoch_rows.append(
            {"epoch": epoch, "accuracy": accuracy, "examples_seen": self.examples_seen(self._step)}
        )
        if epoch < self._params.epochs:
            path = resume_path(self._checkpoint_dir, self.claim.job_id, self.claim.attempt)
            state.save(path, epoch)
            self._resume_file = path.name
        self.flush()
        self._timing = False
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif not self._show_progress:  # no bar (e.g. JSON logs): one log line per epoch instead
            log.info(
                "epoch %d/%d: loss %.4f, test accuracy %.4f",
                epoch,
                self._params.epochs,
                self._last_loss if self._last_loss is not None else math.nan,
                accuracy,
                extra={"epoch": epoch, "loss": self._last_loss, "accuracy": accuracy},
            )
        if self._stop.is_set() and epoch < self._params.epochs:
            raise Shutdown("worker is shutting down; the job resumes after this epoch")

    # --- bookkeeping -------------------------------------------------------------------------

    def examples_seen(self, step: int) -> int:
        """Training images processed once ``step`` steps are done (the tutorial plot's x axis)."""
        if step == 0:
            return 0
        full_epochs, in_epoch = divmod(step - 1, self.steps_per_epoch)
        n = self._params.trainset_size
        return full_epochs * n + min((in_epoch + 1) * self._params.batch_size, n)

    def _step_rows(self) -> list[dict[str, Any]]:
        if not self._losses:
            return []
        losses = torch.stack(self._losses).tolist()  # the one host copy per flush
        self._losses.clear()
        rows = []
        for step, loss in enumerate(losses, start=self._flushed_step + 1):
            if not math.isfinite(loss):
                raise Diverged(
                    f"training diverged: the loss is {loss} at step {step}; "
                    "try a smaller learning_rate"
                )
            rows.append(
                {
                    "step": step,
                    "epoch": (step - 1) // self.steps_per_epoch + 1,
                    "loss": loss,
                    "examples_seen": self.examples_seen(step),
                }
            )
        return rows

    def flush(self) -> None:
        """Write what is buffered in one fenced transaction; raise if the job must stop."""
        started = self._clock()
        rows = self._step_rows()
        epochs, self._epoch_rows = self._epoch_rows, []
        progress = repository.Progress(
            steps=rows,
            epochs=epochs,
            step=self._step,
            epoch=self._epoch,
            accuracy=self._accuracy,
            resume_checkpoint=self._resume_file if epochs else None,
        )
        with self._sessions.begin() as session:
            cancel = repository.record_progress(
                session,
                job_id=self.claim.job_id,
                attempt=self.claim.attempt,
                worker_id=self.claim.worker_id,
                progress=progress,
                lease_s=self._limits.lease_s,
                now=utcnow(),
            )
        self._flushed_step = self._step
        now = self._clock()
        self.last_renewal = now
        self._next_flush = now + self._limits.flush_interval_s
        self.flush_seconds += now - started
        if rows:
            self._last_loss = rows[-1]["loss"]
        self._update_bar(len(rows))
        self._check_limits(cancel, now)

    def _check_limits(self, cancel: bool, now: float) -> None:
        if cancel:
            raise CancelRequested(f"job {self.claim.job_id} was cancelled")
        limit = self._limits.max_runtime_s
        if limit is not None and now - self._started > limit:
            raise RuntimeLimitExceeded(f"the job ran longer than its max_runtime_s of {limit:g} s")
        if self._stop.is_set():
            if self._stop_seen_at is None:
                self._stop_seen_at = now
            if now - self._stop_seen_at >= self._limits.shutdown_grace_s:
                raise Shutdown("worker is shutting down; the epoch did not end within the grace")

    def _open_bar(self) -> None:
        self._bar = tqdm(
            total=self.steps_per_epoch,
            desc=f"job {self.claim.job_id[:8]} epoch {self._epoch + 1}/{self._params.epochs}",
            file=sys.stderr,
            unit="step",
            dynamic_ncols=True,
        )

    def _update_bar(self, new_steps: int) -> None:
        if self._bar is None:
            return
        self._bar.update(new_steps)
        postfix: dict[str, str] = {}
        if self._last_loss is not None:
            postfix["loss"] = f"{self._last_loss:.4f}"
        if self._accuracy is not None:
            postfix["acc"] = f"{self._accuracy:.4f}"
        self._bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        """Close the progress bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
