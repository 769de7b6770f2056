"""The training loop's reporter: the one object the loop calls, ``step`` and ``epoch``.

It composes the pieces that stay out of the loop's way: the buffer that writes steps in fenced
batches (``buffer``), the policy that says when a job must stop (``policy``), the display
(``display``), the thread tuner that times the steps, and the resume state saved after each
epoch but the last. That state is written by the worker's state thread while the next epoch trains,
and the job's row names it with a flush at the first step after it is durable; a worker asked
to stop waits for it, so the job goes back with the epoch kept.

The flushes that fall due between steps, and an epoch's, are written by a thread of their
own while training goes on (one at a time; the worker's :class:`Writers`, shared by a pack's
jobs): the loop hands a batch over and reads how its
write ended at the next step, where a lost lease, a cancel or a failure stops the job as a
flush of its own would have. A stop request makes an epoch's flush wait, so the job goes back
with the epoch kept; ``flush`` and ``drain`` wait too.

While the database cannot be written, flushes fail and the steps stay buffered: training goes
on, and the flushes are retried with backoff, until ``max_buffered_steps`` are waiting; then
the loop waits for the database rather than drop anything.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
from sqlalchemy.orm import Session, sessionmaker

from service.schemas import JobCreate
from service.settings import OUTAGE_BUFFER_STEPS
from service.steps import StepPlan
from service.store.artifacts.backends import Artifacts, FolderArtifacts
from service.store.outage import Backoff, Outage, is_outage, retry
from workers.reporting.buffer import Batch, Claim, ProgressBuffer
from workers.reporting.display import ProgressDisplay
from workers.reporting.policy import Limits, StopPolicy, StorageFailed
from workers.reporting.writers import Writers
from workers.resume import StateWriter, TrainingState
from workers.tuning.threads import ThreadTuner

log = logging.getLogger("workers")


class Reporter:
    """Turns the loop's ``step``/``epoch`` calls into database rows, stops and a display."""

    def __init__(
        self,
        *,
        claim: Claim,
        params: JobCreate,
        sessions: sessionmaker[Session],
        limits: Limits,
        stop: threading.Event,
        checkpoint_dir: Path,
        artifacts: Artifacts | None = None,  # None: files in checkpoint_dir
        show_progress: bool = True,
        threads: ThreadTuner | None = None,
        outage: Outage | None = None,
        max_buffered_steps: int = OUTAGE_BUFFER_STEPS,
        writers: Writers | None = None,  # None: threads of its own
        clock: Callable[[], float] = time.monotonic,
        wait: Callable[[float], object] = time.sleep,
    ) -> None:
        self.claim = claim
        self._params = params
        self._plan = StepPlan.of(params)
        self.steps_per_epoch = self._plan.steps_per_epoch
        self._buffer = ProgressBuffer(
            claim=claim, plan=self._plan, sessions=sessions, lease_s=limits.lease_s
        )
        self._policy = StopPolicy(job_id=claim.job_id, limits=limits, stop=stop, clock=clock)
        self._stop = stop
        self._artifacts = artifacts or FolderArtifacts(checkpoint_dir)
        self._own_writers = writers is None
        self._writers = writers or Writers()
        self._states = StateWriter(
            self._artifacts, claim.job_id, claim.attempt, self._writers.states
        )
        self._display = ProgressDisplay(
            job_id=claim.job_id,
            epochs=params.epochs,
            steps_per_epoch=self.steps_per_epoch,
            show_bar=show_progress,
        )
        self._threads = threads  # told of every step, to time them
        self._timing = False
        self.steps_at: Counter[int] = Counter()  # this job's steps by the tuner's thread count
        self._quiet_since = self._writers.activity.mark()  # the next step's start, for the tuner
        self._clock = clock
        self._flush_interval_s = limits.flush_interval_s
        self._outage = outage or Outage(log, clock=clock)
        self._max_buffered = max_buffered_steps
        self._backoff = Backoff()
        self._wait = wait
        self._resume_kept: str | None = None
        now = clock()
        self._next_flush = now + self._flush_interval_s
        self.last_renewal = now  # read by the heartbeat, which renews the lease when flushes don't
        self.flush_seconds = 0.0  # time spent in flushes' writes: what persistence costs
        self._writing: tuple[Future[bool], Batch, float] | None = None  # in flight, since
        self._epoch_due = False  # an epoch ended during a write: it goes with the next, at once

    @property
    def tuner(self) -> ThreadTuner | None:
        """The thread tuner that times this job's steps, if it does."""
        return self._threads

    def time_steps_for(self, tuner: ThreadTuner) -> None:
        """Time this job's steps for ``tuner`` from its next step on: a pack's job takes the
        timing over when the job that did it leaves the pack."""
        self._threads, self._timing = tuner, False

    @property
    def trained_at(self) -> str:
        """How many of this job's steps ran at each thread count the tuner held, for the job's
        log line ("; steps by thread count: 1: 31, 2: 440"); empty without a tuner. What a job
        took depends on it (docs/benchmarks.md), and nothing else tells it afterwards."""
        if not self.steps_at:
            return ""
        counts = ", ".join(f"{n}: {steps}" for n, steps in sorted(self.steps_at.items()))
        return f"; steps by thread count: {counts}"

    @property
    def unsynced_steps(self) -> list[dict[str, Any]]:
        """The steps written since the last synchronous commit, for the job's ending to store
        again if a crash of the PostgreSQL server lost them (:func:`queue_repo.finish_job`)."""
        return self._buffer.unsynced

    def resume_at(self, epoch: int, accuracy: float | None) -> None:
        """Continue counting after ``epoch`` finished epochs (a resumed attempt)."""
        self._buffer.resume_at(epoch, accuracy)

    # --- called by the training loop ---------------------------------------------------------

    def step(self, loss: torch.Tensor) -> None:
        """Buffer one step's loss; flush when the interval has passed."""
        self._display.step_taken(self._buffer.epoch)
        self._buffer.add_step(loss)
        if self._threads is not None:
            self.steps_at[self._threads.threads] += 1
            # The first step of a job or an epoch follows setup or evaluation: not timed.
            if self._timing:
                quiet = self._writers.activity.quiet_since(self._quiet_since)
                self._threads.step(beside_writes=not quiet)
            else:
                self._threads.begin()
                self._timing = True
            self._quiet_since = self._writers.activity.mark()
        if self._buffer.unwritten >= self._max_buffered:
            self.flush()  # the database has been down a while: wait for it here
        elif not self._write_behind_due():
            return
        if self._threads is not None:
            self._threads.resume_timing()

    def _write_behind_due(self) -> bool:
        """Act on a write that has ended, and hand over the next one when it is due (or when a
        state was just written: named at once, not at the job's end; or an epoch waits for its
        write); whether anything was done."""
        acted = False
        if self._writing is not None and self._writing[0].done():
            self._settle()
            acted = True
        epoch_due = self._epoch_due and self._buffer.has_epochs  # not written by a flush since
        due = self._clock() >= self._next_flush or self._states.ready or epoch_due
        if self._writing is None and due:
            self._write_behind()
            acted = True
        return acted

    def epoch(self, epoch: int, accuracy: float, state: TrainingState) -> None:
        """Record an epoch's accuracy (and the state to resume from) and flush at once.

        A stop request waits for this point, so the job goes back to the queue with its
        finished epochs kept.
        """
        if epoch < self._params.epochs:
            self._states.submit(state.snapshot(epoch), epoch)
        else:  # the last epoch's flush names what the previous one left (long written by now)
            self._record_written_state(wait=True)
        self._buffer.add_epoch(epoch, accuracy)
        if self._stop.is_set():
            self.flush()
        elif self._writing is not None and not self._writing[0].done():
            # The previous write is still in flight (SQLite's busy wait, an outage): the epoch
            # goes with the next write, handed over at the first step after that one ends.
            # Waiting for it here held training for as long as the database was locked.
            self._epoch_due = True
        else:
            self._settle()
            self._write_behind()
        if self._stop.is_set() and self._states.in_flight:
            # The stop came during that flush, after it looked: name this epoch's state now,
            # so the job goes back with the epoch kept, as the policy below promises.
            self.flush()
        self._timing = False
        self._display.epoch_done(epoch, self._buffer.newest_loss, accuracy)
        self._policy.at_epoch_end(epoch, self._params.epochs)

    # --- bookkeeping -------------------------------------------------------------------------

    def examples_seen(self, step: int) -> int:
        """Training images processed once ``step`` steps are done."""
        return self._plan.examples_seen(step)

    def flush(self) -> None:
        """Write what is buffered in one fenced transaction, now; raise if the job must stop.

        While the database is down, the steps stay buffered and the next try waits a backoff
        delay; a full buffer waits here until the database is back.
        """
        self._settle()
        started = self._clock()
        # A stopping worker waits for the state in flight: the job goes back with it named.
        self._record_written_state(wait=self._stop.is_set())
        batch = self._buffer.take()
        try:
            cancel = self._buffer.write(batch)
        except Exception as exc:
            if not is_outage(exc):
                raise
            self._down(exc)
            return
        self._done(batch, cancel, self._clock() - started)

    def _write_behind(self) -> None:
        """Hand what is buffered to the writing thread; training goes on meanwhile."""
        self._epoch_due = False
        self._record_written_state(wait=False)
        batch = self._buffer.take()
        self._writing = (self._writers.flushes.submit(self._write, batch), batch, self._clock())

    def _write(self, batch: Batch) -> bool:
        """On the writing thread: the write, and the lease it renewed (for the heartbeat)."""
        cancel = self._buffer.write(batch)
        self.last_renewal = self._clock()
        return cancel

    def _settle(self) -> None:
        """Wait for the write in flight, if any, and act on how it ended."""
        if self._writing is None:
            return
        future, batch, started = self._writing
        self._writing = None
        try:
            cancel = future.result()
        except Exception as exc:
            if not is_outage(exc):
                raise
            self._down(exc)
            return
        self._done(batch, cancel, self._clock() - started)

    def _down(self, exc: Exception) -> None:
        """A write failed for an outage: the steps stay buffered, and the next try waits a
        backoff delay; a full buffer waits here until the database is back."""
        self._outage.failed(exc, "flush")
        if self._buffer.unwritten < self._max_buffered:
            self._next_flush = self._clock() + self._backoff.next_delay()
            return
        log.warning(
            "%d steps are waiting for the database: training pauses until it is back",
            self._buffer.unwritten,
        )
        started = self._clock()
        written, cancel = self._write_all()
        self._after(written, cancel, self._clock() - started)

    def _done(self, batch: Batch, cancel: bool, seconds: float) -> None:
        self._after(self._buffer.written(batch), cancel, seconds)

    def _after(self, written: int, cancel: bool, seconds: float) -> None:
        """A write succeeded: renew, schedule the next, then stop the job if it must."""
        self._outage.ok()
        self._backoff.reset()
        self._after_write()
        now = self._clock()
        self.last_renewal = now
        self._next_flush = now + self._flush_interval_s
        self.flush_seconds += seconds
        self._display.flushed(written, self._buffer.last_loss, self._buffer.accuracy)
        self._policy.check(cancel_requested=cancel, now=now)

    def drain(self) -> None:
        """Write every buffered step and epoch, waiting out an outage (before the job ends)."""
        self._settle()
        self._record_written_state(wait=True)
        if self._buffer.unwritten or self._buffer.has_epochs:
            self._write_all()
            self._after_write()

    def _record_written_state(self, *, wait: bool) -> None:
        """Hand the newest durable training state to the buffer (``wait``: for those in flight)."""
        try:
            written = self._states.written(wait=wait)
        except (OSError, RuntimeError) as exc:  # torch reports a failed write as either
            raise StorageFailed("could not write the training state") from exc
        if written is not None:
            saved, epoch = written
            self._buffer.add_resume_point(saved.ref, epoch, saved.blob)

    def _write_all(self) -> tuple[int, bool]:
        return retry(self._buffer.flush, outage=self._outage, what="flush", wait=self._wait)

    def _after_write(self) -> None:
        """The job's row names the newest training state now: older ones are not needed."""
        keep = self._buffer.resume_file
        if keep is not None and keep != self._resume_kept:
            self._states.keep_only(keep)
            self._resume_kept = keep

    def close(self) -> None:
        """Wait for a write in flight (the job has ended: how it ends no longer matters) and
        for a state in flight (and delete it: the job's row never named it); close the display."""
        if self._writing is not None:
            self._writing[0].exception()  # waits
            self._writing = None
        self._states.close()
        if self._own_writers:
            self._writers.shutdown()
        self._display.close()
