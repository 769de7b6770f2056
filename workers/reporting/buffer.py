"""Buffering and persistence: step losses kept on the device, written in fenced batches.

A flush is one transaction (:func:`service.store.queue_repo.record_progress`): insert the
buffered steps and epochs, advance the job's progress, renew its lease, read
``cancel_requested``. The losses stay on the device between flushes, so the loop never waits
for the host, and one ``tolist`` per flush brings them over.

A write that fails (the database is down) loses nothing: the steps and epochs stay buffered,
on the host, until a later flush writes them. That later write replaces whatever of them the
failed one may have committed before its connection broke, so each step is stored once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from sqlalchemy.orm import Session, sessionmaker

from service.clock import utcnow
from service.steps import StepPlan
from service.store import queue_repo
from service.store.artifacts.repo import Blob
from workers.reporting.policy import Diverged


@dataclass(frozen=True)
class Claim:
    """The attempt a worker holds: every write it makes is fenced on these."""

    job_id: str
    attempt: int
    worker_id: str


@dataclass(frozen=True)
class Batch:
    """One write's worth of the buffer, taken on the training thread
    (:meth:`ProgressBuffer.take`)."""

    progress: queue_repo.Progress
    resume_due: tuple[str, int, Blob | None] | None


class ProgressBuffer:
    """The steps and epochs not yet written, and the fenced write that stores them."""

    def __init__(
        self, *, claim: Claim, plan: StepPlan, sessions: sessionmaker[Session], lease_s: float
    ) -> None:
        self.claim = claim
        self.plan = plan
        self._sessions = sessions
        self._lease_s = lease_s
        self._losses: list[torch.Tensor] = []  # on the device, after the host's losses
        self._host_losses: list[float] = []  # steps flushed_step+1 … on the host, not written
        self._failed_write = False  # the last write failed: it may have committed some rows
        self.step = 0  # steps taken
        self.flushed_step = 0  # steps written
        self.epoch = 0
        self.accuracy: float | None = None
        self._epoch_rows: list[dict[str, Any]] = []
        self.resume_file: str | None = None  # the training state the job's row names
        # One written, not yet recorded: its name, epoch and (database) bytes.
        self._resume_due: tuple[str, int, Blob | None] | None = None
        self.last_loss: float | None = None
        # Steps stored since the last synchronous commit (PostgreSQL may lose them in a crash
        # of its server): the next synchronous write checks them and stores them again if so.
        self._unsynced: list[dict[str, Any]] = []

    @property
    def unwritten(self) -> int:
        """Steps taken but not written yet."""
        return self.step - self.flushed_step

    @property
    def unsynced(self) -> list[dict[str, Any]]:
        """The steps written since the last synchronous commit (PostgreSQL may have lost them
        in a crash of its server): a job's last write stores them again if so."""
        return list(self._unsynced)

    @property
    def newest_loss(self) -> float | None:
        """The loss of the latest step taken, written or not (an epoch's log line shows its
        last step's: the last one written may be an earlier epoch's, or none yet)."""
        if self._losses:
            return float(self._losses[-1].item())  # once an epoch: its evaluation synced already
        if self._host_losses:
            return self._host_losses[-1]
        return self.last_loss

    @property
    def has_epochs(self) -> bool:
        """Whether an epoch's row (or a resume point) waits to be written."""
        return bool(self._epoch_rows) or self._resume_due is not None

    def resume_at(self, epoch: int, accuracy: float | None) -> None:
        """Continue counting after ``epoch`` finished epochs (a resumed attempt)."""
        self.epoch = epoch
        self.step = self.flushed_step = self.plan.steps_before(epoch)
        self.accuracy = accuracy

    def add_step(self, loss: torch.Tensor) -> None:
        """Keep one step's loss (a device tensor) until the next flush."""
        self._losses.append(loss)
        self.step += 1

    def add_epoch(self, epoch: int, accuracy: float) -> None:
        """Keep an epoch's accuracy."""
        self.epoch = epoch
        self.accuracy = accuracy
        self._epoch_rows.append(self.plan.epoch_row(epoch, accuracy))

    def add_resume_point(self, resume_file: str, epoch: int, blob: Blob | None = None) -> None:
        """Keep the training state after ``epoch``, durable in ``resume_file`` (or in ``blob``,
        which the write stores), for the next write to name as the point a retry resumes from."""
        self._resume_due = (resume_file, epoch, blob)

    def _to_host(self) -> None:
        """Bring the device's losses over (the one host copy per flush), checking each."""
        if not self._losses:
            return
        losses = torch.stack(self._losses).tolist()
        self._losses.clear()
        first = self.flushed_step + len(self._host_losses) + 1
        for step, loss in enumerate(losses, start=first):
            if not math.isfinite(loss):
                raise Diverged(
                    f"training diverged: the loss is {loss} at step {step}; "
                    "try a smaller learning_rate"
                )
        self._host_losses.extend(losses)

    def flush(self) -> tuple[int, bool]:
        """Write what is buffered in one fenced transaction: (steps written, cancel asked).

        Raises :class:`~service.errors.LeaseLost` (nothing written) once the job is not ours;
        on any failure the buffer keeps what it holds.
        """
        batch = self.take()
        cancel = self.write(batch)
        return self.written(batch), cancel

    def take(self) -> Batch:
        """What the next write stores (the losses brought over first); the buffer keeps it
        until :meth:`written` says it is stored. Called on the training thread."""
        self._to_host()
        first = self.flushed_step + 1
        rows = [
            self.plan.step_row(step, loss) for step, loss in enumerate(self._host_losses, first)
        ]
        due = self._resume_due
        synchronous = bool(self._epoch_rows) or due is not None
        progress = queue_repo.Progress(
            steps=rows,
            epochs=list(self._epoch_rows),
            step=self.step,
            epoch=self.epoch,
            accuracy=self.accuracy,
            resume_checkpoint=None if due is None else due[0],
            resume_epoch=None if due is None else due[1],
            resume_blob=None if due is None else due[2],
            replace=self._failed_write,
            unsynced=list(self._unsynced) if synchronous else [],
        )
        self._failed_write = True  # until written() says otherwise: its outcome is unknown
        return Batch(progress, due)

    def write(self, batch: Batch) -> bool:
        """The fenced transaction that stores ``batch``; True if cancel was asked. Touches
        nothing of the buffer, so it may run on a thread of its own while training goes on."""
        with self._sessions.begin() as session:
            return queue_repo.record_progress(
                session,
                job_id=self.claim.job_id,
                attempt=self.claim.attempt,
                worker_id=self.claim.worker_id,
                progress=batch.progress,
                lease_s=self._lease_s,
                now=utcnow(),
            )

    def written(self, batch: Batch) -> int:
        """``batch`` is stored: forget it (what was buffered since stays); the steps written."""
        progress = batch.progress
        rows = progress.steps
        self._failed_write = False
        del self._host_losses[: len(rows)]
        del self._epoch_rows[: len(progress.epochs)]
        if batch.resume_due is not None:
            self.resume_file = batch.resume_due[0]
            if self._resume_due is batch.resume_due:
                self._resume_due = None
        if progress.epochs or batch.resume_due is not None:
            self._unsynced = []  # a synchronous commit: everything before it is durable
        else:
            self._unsynced.extend(rows)
        self.flushed_step = progress.step
        if rows:
            self.last_loss = float(rows[-1]["loss"])
        return len(rows)
