"""The training loop's reporter: the one object the loop calls, ``step`` and ``epoch``.

It composes the pieces that stay out of the loop's way: the buffer that writes steps in fenced
batches (``buffer``), the policy that says when a job must stop (``policy``), the display
(``display``), the thread tuner that times the steps, and the resume state saved after each
epoch but the last.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from sqlalchemy.orm import Session, sessionmaker

from service.schemas import JobCreate
from service.steps import StepPlan
from workers.reporting.buffer import Claim, ProgressBuffer
from workers.reporting.display import ProgressDisplay
from workers.reporting.policy import Limits, StopPolicy
from workers.resume import TrainingState, resume_path
from workers.threads import ThreadTuner


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
        show_progress: bool = True,
        threads: ThreadTuner | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.claim = claim
        self._params = params
        self._plan = StepPlan.of(params)
        self.steps_per_epoch = self._plan.steps_per_epoch
        self._buffer = ProgressBuffer(
            claim=claim, plan=self._plan, sessions=sessions, lease_s=limits.lease_s
        )
        self._policy = StopPolicy(job_id=claim.job_id, limits=limits, stop=stop, clock=clock)
        self._display = ProgressDisplay(
            job_id=claim.job_id,
            epochs=params.epochs,
            steps_per_epoch=self.steps_per_epoch,
            show_bar=show_progress,
        )
        self._threads = threads  # told of every step, to time them
        self._timing = False
        self._checkpoint_dir = checkpoint_dir
        self._clock = clock
        self._flush_interval_s = limits.flush_interval_s
        now = clock()
        self._next_flush = now + self._flush_interval_s
        self.last_renewal = now  # read by the heartbeat, which renews the lease when flushes don't
        self.flush_seconds = 0.0  # time spent in flushes: what persistence costs the job

    def resume_at(self, epoch: int, accuracy: float | None) -> None:
        """Continue counting after ``epoch`` finished epochs (a resumed attempt)."""
        self._buffer.resume_at(epoch, accuracy)

    # --- called by the training loop ---------------------------------------------------------

    def step(self, loss: torch.Tensor) -> None:
        """Buffer one step's loss; flush when the interval has passed."""
        self._display.step_taken(self._buffer.epoch)
        self._buffer.add_step(loss)
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
        resume_file = None
        if epoch < self._params.epochs:
            path = resume_path(self._checkpoint_dir, self.claim.job_id, self.claim.attempt)
            state.save(path, epoch)
            resume_file = path.name
        self._buffer.add_epoch(epoch, accuracy, resume_file)
        self.flush()
        self._timing = False
        self._display.epoch_done(epoch, self._buffer.last_loss, accuracy)
        self._policy.at_epoch_end(epoch, self._params.epochs)

    # --- bookkeeping -------------------------------------------------------------------------

    def examples_seen(self, step: int) -> int:
        """Training images processed once ``step`` steps are done."""
        return self._plan.examples_seen(step)

    def flush(self) -> None:
        """Write what is buffered in one fenced transaction; raise if the job must stop."""
        started = self._clock()
        written, cancel = self._buffer.flush()
        now = self._clock()
        self.last_renewal = now
        self._next_flush = now + self._flush_interval_s
        self.flush_seconds += now - started
        self._display.flushed(written, self._buffer.last_loss, self._buffer.accuracy)
        self._policy.check(cancel_requested=cancel, now=now)

    def close(self) -> None:
        """Close the progress display."""
        self._display.close()
