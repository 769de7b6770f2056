"""Training state saved after each epoch, so a retried job resumes instead of starting over.

The state is the model, the optimizer (Adam's moments and step counts) and the random
generators (the epoch shuffle's and torch's global one): restoring it continues the run
exactly, step for step, as if it had never stopped. Files are plain tensors and containers,
written atomically and read with ``weights_only=True``.
"""

from __future__ import annotations

import copy
from collections.abc import Collection
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from service.ml import SimpleMLP, atomic_torch_save, to_host

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

    def restore(self, path: Path) -> int:
        """Load the state at ``path`` into this run; returns the epoch it was saved after."""
        saved = torch.load(path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(saved["model"])
        groups = saved["optimizer"]["param_groups"]
        for group, live in zip(groups, self.optimizer.param_groups, strict=True):
            group.update({k: live[k] for k in OPTIMIZER_IMPLEMENTATION if k in live})
        self.optimizer.load_state_dict(saved["optimizer"])
        self.shuffle.set_state(saved["shuffle_rng"])
        torch.set_rng_state(saved["torch_rng"])
        return int(saved["epoch"])


def resume_path(checkpoint_dir: Path, job_id: str, attempt: int, epoch: int) -> Path:
    """Where an attempt keeps its training state after ``epoch``.

    One file per epoch: while the database cannot be written, later epochs are saved without
    overwriting the one the job's row names, which a retry resumes from.
    """
    return checkpoint_dir / f"{job_id}-{attempt}-e{epoch}.resume.pt"


def remove_stale_resume_files(checkpoint_dir: Path, job_id: str, keep: Collection[str]) -> None:
    """Delete a job's training states but those in ``keep`` (the one its row now names, and
    any still being written)."""
    for path in checkpoint_dir.glob(f"{job_id}-*.resume.pt"):
        if path.name not in keep:
            path.unlink(missing_ok=True)


class StateWriter:
    """Writes training states in a thread of their own, one at a time and in order.

    Writing one (the copy to disk, its fsync, the rename) would otherwise hold up the next
    epoch's steps. A state counts only once :meth:`written` has returned it, i.e. once it is
    durable on disk; only then may the job's row name it.
    """

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[tuple[Future[None], Path, int]] = []

    def submit(self, snapshot: dict[str, Any], path: Path, epoch: int) -> None:
        """Start writing ``snapshot`` (from :meth:`TrainingState.snapshot`) to ``path``."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="resume-state")
        self._pending.append((self._pool.submit(atomic_torch_save, snapshot, path), path, epoch))

    @property
    def in_flight(self) -> set[str]:
        """The names of the files still being written (or written but not yet returned)."""
        return {path.name for _, path, _ in self._pending}

    def written(self, *, wait: bool) -> tuple[str, int] | None:
        """The newest state written since the last call, as (file name, epoch), or None;
        ``wait`` waits for those in flight. A failed write raises its error here."""
        newest = None
        while self._pending and (wait or self._pending[0][0].done()):
            future, path, epoch = self._pending.pop(0)
            future.result()
            newest = (path.name, epoch)
        return newest

    def close(self) -> None:
        """Wait for the writes in flight, and delete their files: no row names them."""
        for future, path, _ in self._pending:
            future.exception()  # waits; the job has ended one way or another
            path.unlink(missing_ok=True)
        self._pending = []
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def remove_resume_files(checkpoint_dir: Path, job_id: str) -> None:
    """Delete every attempt's training state of a job that has ended."""
    for path in checkpoint_dir.glob(f"{job_id}-*.resume.pt"):
        path.unlink(missing_ok=True)
