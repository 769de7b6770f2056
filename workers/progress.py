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
from typing import Any

import torch
from sqlalchemy.orm import Session, sessionmaker
from tqdm import tqdm

from service import repository
from service.clock import utcnow
from service.errors import CancelRequested, LeaseLost
from service.schemas import JobCreate

log = logging.getLogger("workers")


class Shutdown(Exception):
    """The worker was asked to stop; the job goes back to the queue."""


class Diverged(Exception):
    """A step's loss was not finite; training cannot meaningfully go on."""


@dataclass(frozen=True)
class Claim:
    """The attempt a worker holds: every write it makes is fenced on these."""

    job_id: str
    attempt: int
    worker_id: str


class Reporter:
    """Turns the loop's ``step``/``epoch`` calls into database rows and a tqdm bar."""

    def __init__(
        self,
        *,
        claim: Claim,
        params: JobCreate,
        sessions: sessionmaker[Session],
        lease_s: float,
        flush_interval_s: float,
        stop: threading.Event,
        show_progress: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.claim = claim
        self._params = params
        self._sessions = sessions
        self._lease_s = lease_s
        self._flush_interval_s = flush_interval_s
        self._stop = stop
        self._clock = clock
        self._show_progress = show_progress
        self.steps_per_epoch = math.ceil(params.trainset_size / params.batch_size)

        self._losses: list[torch.Tensor] = []
        self._step = 0  # steps taken
        self._flushed_step = 0  # steps written
        self._epoch = 0
        self._accuracy: float | None = None
        self._epoch_rows: list[dict[str, Any]] = []
        self._next_flush = clock() + flush_interval_s
        self.last_renewal = clock()
        self.flush_seconds = 0.0  # time spent in flushes: what persistence costs the job
        self._bar: tqdm[Any] | None = None
        self._last_loss: float | None = None

    # --- called by the training loop ---------------------------------------------------------

    def step(self, loss: torch.Tensor) -> None:
        """Buffer one step's loss; flush when the interval has passed."""
        if self._bar is None and self._show_progress:
            self._open_bar()
        self._losses.append(loss)
        self._step += 1
        if self._clock() >= self._next_flush:
            self.flush()

    def epoch(self, epoch: int, accuracy: float) -> None:
        """Record an epoch's accuracy and flush at once, so clients see it promptly."""
        self._epoch = epoch
        self._accuracy = accuracy
        self._epoch_rows.append(
            {"epoch": epoch, "accuracy": accuracy, "examples_seen": self.examples_seen(self._step)}
        )
        self.flush()
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
            steps=rows, epochs=epochs, step=self._step, epoch=self._epoch, accuracy=self._accuracy
        )
        with self._sessions.begin() as session:
            cancel = repository.record_progress(
                session,
                job_id=self.claim.job_id,
                attempt=self.claim.attempt,
                worker_id=self.claim.worker_id,
                progress=progress,
                lease_s=self._lease_s,
                now=utcnow(),
            )
        self._flushed_step = self._step
        now = self._clock()
        self.last_renewal = now
        self._next_flush = now + self._flush_interval_s
        self.flush_seconds += now - started
        if rows:
            self._last_loss = rows[-1]["loss"]
        self._update_bar(len(rows))
        if cancel:
            raise CancelRequested(f"job {self.claim.job_id} was cancelled")
        if self._stop.is_set():
            raise Shutdown("worker is shutting down")

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


class LeaseKeeper(threading.Thread):
    """Renews the lease while the loop is silent (loading data, evaluating), off the loop's path.

    Flushes renew the lease too; this only writes when none has for ``heartbeat_s``. What it
    learns (cancel asked, lease lost) it leaves for the reporter's next flush to act on.
    """

    def __init__(
        self,
        reporter: Reporter,
        sessions: sessionmaker[Session],
        *,
        heartbeat_s: float,
        lease_s: float,
    ) -> None:
        super().__init__(name=f"lease-{reporter.claim.job_id[:8]}", daemon=True)
        self._reporter = reporter
        self._sessions = sessions
        self._heartbeat_s = heartbeat_s
        self._lease_s = lease_s
        self._done = threading.Event()

    def run(self) -> None:
        """Heartbeat until stopped or the lease is gone."""
        claim = self._reporter.claim
        while not self._done.wait(self._heartbeat_s / 2):
            if time.monotonic() - self._reporter.last_renewal < self._heartbeat_s:
                continue
            try:
                with self._sessions.begin() as session:
                    repository.heartbeat(
                        session,
                        job_id=claim.job_id,
                        attempt=claim.attempt,
                        worker_id=claim.worker_id,
                        lease_s=self._lease_s,
                        now=utcnow(),
                    )
                self._reporter.last_renewal = time.monotonic()
            except LeaseLost:
                return
            except Exception:  # noqa: BLE001 - a missed heartbeat is retried; the lease has slack
                continue

    def stop(self) -> None:
        """Stop heartbeating and wait for the thread."""
        self._done.set()
        self.join()
