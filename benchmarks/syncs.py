"""Host synchronisations on a CUDA card, counted by the line of the service's code that made them.

``torch.cuda.set_sync_debug_mode("warn")`` makes every operation that waits for the card raise a
warning. Each one is charged to the innermost frame of ``service/`` or ``workers/`` on the stack
when it is raised, so a report says which line waits, and how often.
"""

from __future__ import annotations

import contextlib
import traceback
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.env import REPO_ROOT

OURS = ("service", "workers")  # the folders whose lines a synchronisation is charged to


@dataclass(frozen=True)
class Syncs:
    """The host synchronisations of one job, by the line of our code that made them."""

    steps: int
    epochs: int
    flushes_and_epochs: int
    sites: Counter[str] | None  # None: not counted (only CUDA reports them)

    @property
    def per_step(self) -> bool:
        """Whether some line synchronised as often as an epoch has steps (or nothing was counted).

        Lines that wait once per job (the model's copy to the card, one per tensor), per epoch
        or per flush stay far below that; a line in the step's path reaches it.
        """
        if self.sites is None:
            return True
        steps_per_epoch = max(1, self.steps // max(1, self.epochs))
        return any(n >= steps_per_epoch for n in self.sites.values())

    def describe(self) -> str:
        """The count and where it comes from, most frequent line first."""
        if self.sites is None:
            return "not counted on this device"
        where = "; ".join(f"{site} ×{n}" for site, n in self.sites.most_common())
        return (
            f"{self.sites.total()} synchronising calls in {self.steps} steps "
            f"({self.flushes_and_epochs} flushes + epochs): {where or 'none'}"
        )


def our_caller() -> str:
    """The innermost frame of the service's code on the stack, as ``path:line (function)``.

    Without one, the innermost frame that raised the warning, marked as outside.
    """
    # This module's frames and the warnings module's are the report's machinery, not a caller.
    skip = {__file__, warnings.__file__}
    stack = [f for f in traceback.extract_stack() if f.filename not in skip]
    for frame in reversed(stack):
        path = Path(frame.filename)
        if path.is_relative_to(REPO_ROOT) and path.relative_to(REPO_ROOT).parts[0] in OURS:
            return f"{path.relative_to(REPO_ROOT)}:{frame.lineno} ({frame.name})"
    if not stack:
        return "outside the service"
    last = stack[-1]
    where = "/".join(Path(last.filename).parts[-2:])  # e.g. torch/serialization.py
    return f"outside the service: {where}:{last.lineno} ({last.name})"


@contextlib.contextmanager
def synchronisations(device: torch.device) -> Iterator[Counter[str]]:
    """Count the block's host synchronisations on ``device`` by :func:`our_caller`'s site.

    Only CUDA reports them: on another device the counter stays empty.
    """
    sites: Counter[str] = Counter()

    shown = warnings.showwarning

    def record(message: Warning | str, *args: Any, **kwargs: Any) -> None:
        if "synchroniz" in str(message):
            sites[our_caller()] += 1  # called while the warning is raised: the stack is the op's
        else:
            shown(message, *args, **kwargs)  # any other warning is shown as it would have been

    with warnings.catch_warnings():  # restores showwarning too
        warnings.simplefilter("always")
        warnings.showwarning = record
        if device.type != "cuda":
            yield sites
            return
        before = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield sites
        finally:
            torch.cuda.set_sync_debug_mode(before)
