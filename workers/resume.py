"""Training state saved after each epoch, so a retried job resumes instead of starting over.

The state is the model, the optimizer (Adam's moments and step counts) and the random
generators (the epoch shuffle's and torch's global one): restoring it continues the run
exactly, step for step, as if it had never stopped. States are plain tensors and containers,
stored where :mod:`service.artifacts` says and read with ``weights_only=True``.
"""

from __future__ import annotations

import copy
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from service.ml import SimpleMLP, atomic_torch_save, to_host
from service.store.artifacts.backends import Artifacts, Saved, Source, resume_name

log = logging.getLogger("workers")

SavedState = dict[str, Any]  # what a state file holds: plain tensors and containers
STATE_KEYS = ("epoch", "model", "optimizer", "shuffle_rng", "torch_rng")


class UnusableState(Exception):
    """A saved state that does not load as this code's state after the epoch it should be."""


def load_state(source: Source) -> SavedState:
    """The training state ``source`` holds, read without unpickling code."""
    saved: SavedState = torch.load(source, map_location="cpu", weights_only=True)
    return saved


def usable_state(source: Source, *, epoch: int) -> SavedState:
    """:func:`load_state`, checked to be a state of this code saved after ``epoch``; else
    :class:`UnusableState`. A retry finds a damaged state (truncated, overwritten, another
    torch's) here, and starts over as it does when the state is missing: found later, as
    :meth:`TrainingState.restore` loads it, it failed the job for good, and every job of its
    pack with it."""
    try:
        saved = load_state(source)
        if not isinstance(saved, dict) or any(key not in saved for key in STATE_KEYS):
            raise UnusableState("not a training state")
        SimpleMLP().load_state_dict(saved["model"])  # the shapes are this code's
        if int(saved["epoch"]) != epoch:
            raise UnusableState(f"saved after epoch {saved['epoch']}, not {epoch}")
    except UnusableState:
        raise
    except Exception as exc:  # torch raises many types for a damaged file
        raise UnusableState(f"{type(exc).__name__}: {exc}") from exc
    return saved


# How the optimizer computes, not what it has learned: a state saved on one device (or in
# eager mode) resumes with the implementation chosen for this run (fused, capturable for a
# CUDA graph), not the saved one.
OPTIMIZER_IMPLEMENTATION = ("foreach", "fused", "capturable", "differentiable")


@dataclass(frozen=True)
class TrainingState:
    """Live references to what a resumed run needs; captured (copied) only when saved."""

    model: SimpleMLP
    optimizer: torch.optim.Optimizer
    shuffle: torch.Generator

    def snapshot(self, epoch: int) -> dict[str, Any]:
        """The state after ``epoch``, copied to the host: training goes on while it is written."""
        state = {
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "shuffle_rng": self.shuffle.get_state(),
            "torch_rng": torch.get_rng_state(),
        }
        # On the CPU, to_host returns the live tensors themselves: the next step changes them.
        return copy.deepcopy(to_host(state))

    def save(self, path: Path, epoch: int) -> None:
        """Write the state after ``epoch`` to ``path`` atomically."""
        atomic_torch_save(self.snapshot(epoch), path)

    def restore(self, saved: SavedState) -> int:
        """Load ``saved`` (:func:`usable_state`) into this run; returns the epoch it was saved
        after."""
        self.model.load_state_dict(saved["model"])
        groups = saved["optimizer"]["param_groups"]
        for group, live in zip(groups, self.optimizer.param_groups, strict=True):
            group.update({k: live[k] for k in OPTIMIZER_IMPLEMENTATION if k in live})
        self.optimizer.load_state_dict(saved["optimizer"])
        self.shuffle.set_state(saved["shuffle_rng"])
        torch.set_rng_state(saved["torch_rng"])
        return int(saved["epoch"])


def _log_failure(future: Future[None]) -> None:
    """An older state that could not be deleted costs disk space, not the job: logged."""
    exc = future.exception()
    if exc is not None:
        log.warning("could not delete an older training state: %s", exc)


class StateWriter:
    """Writes training states in the worker's state thread (:class:`workers.reporting.writers.
    Writers`, shared by the jobs of a pack), one at a time and in order.

    Writing one (serialising it; with ``MNIST_ARTIFACTS=folder`` also the file's fsync and
    rename) would otherwise hold up the next epoch's steps. A state counts only once
    :meth:`written` has returned it: a durable file, or (database) the bytes that the next
    fenced flush stores in the transaction that names them. Only then may the job's row name it.
    """

    def __init__(
        self, artifacts: Artifacts, job_id: str, attempt: int, thread: ThreadPoolExecutor
    ) -> None:
        self._artifacts = artifacts
        self._job_id = job_id
        self._attempt = attempt
        self._thread = thread  # one thread, shared with the worker's other jobs (Writers)
        self._pending: list[tuple[Future[Saved], int]] = []
        self._upkeep: list[Future[None]] = []  # deletions of older states

    def submit(self, snapshot: dict[str, Any], epoch: int) -> None:
        """Start writing ``snapshot`` (from :meth:`TrainingState.snapshot`), the state after
        ``epoch``."""
        future = self._thread.submit(
            self._artifacts.save, snapshot, job_id=self._job_id, attempt=self._attempt, epoch=epoch
        )
        self._pending.append((future, epoch))

    def keep_only(self, ref: str) -> None:
        """Delete the job's training states but ``ref`` and those in flight, in the writing
        thread: listing a folder that holds every job's files takes the training loop's time
        otherwise. After the states submitted so far (kept), before any submitted later."""
        keep = {ref, *self.in_flight}
        done = self._thread.submit(self._artifacts.keep_resume, self._job_id, keep=keep)
        done.add_done_callback(_log_failure)
        self._upkeep = [f for f in self._upkeep if not f.done()] + [done]

    @property
    def ready(self) -> bool:
        """Whether a state has been written that :meth:`written` has not returned yet."""
        return bool(self._pending) and self._pending[0][0].done()

    @property
    def in_flight(self) -> set[str]:
        """The names of the states still being written (or written but not yet returned)."""
        return {resume_name(self._job_id, self._attempt, epoch) for _, epoch in self._pending}

    def written(self, *, wait: bool) -> tuple[Saved, int] | None:
        """The newest state written since the last call, with its epoch, or None; ``wait``
        waits for those in flight. A failed write raises its error here."""
        newest = None
        while self._pending and (wait or self._pending[0][0].done()):
            future, epoch = self._pending.pop(0)
            newest = (future.result(), epoch)
        return newest

    def close(self) -> None:
        """Wait for the writes in flight, and discard them: no row names them; and for the
        deletions handed over."""
        for future, _ in self._pending:
            if future.exception() is None:  # waits; the job has ended one way or another
                self._artifacts.discard(future.result())
        self._pending = []
        for done in self._upkeep:
            done.exception()  # waits; a failure was logged
        self._upkeep = []
