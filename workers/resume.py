"""Training state saved after each epoch, so a retried job resumes instead of starting over.

The state is the model, the optimizer (Adam's moments and step counts) and the random
generators (the epoch shuffle's and torch's global one): restoring it continues the run
exactly, step for step, as if it had never stopped. Files are plain tensors and containers,
written atomically and read with ``weights_only=True``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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

    def save(self, path: Path, epoch: int) -> None:
        """Write the state after ``epoch`` to ``path`` atomically."""
        state = {
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "shuffle_rng": self.shuffle.get_state(),
            "torch_rng": torch.get_rng_state(),
        }
        atomic_torch_save(to_host(state), path)

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


def remove_stale_resume_files(checkpoint_dir: Path, job_id: str, keep: str) -> None:
    """Delete a job's training states but ``keep``, the one its row now names."""
    for path in checkpoint_dir.glob(f"{job_id}-*.resume.pt"):
        if path.name != keep:
            path.unlink(missing_ok=True)


def remove_resume_files(checkpoint_dir: Path, job_id: str) -> None:
    """Delete every attempt's training state of a job that has ended."""
    for path in checkpoint_dir.glob(f"{job_id}-*.resume.pt"):
        path.unlink(missing_ok=True)
