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

import torch

from benchmarks.env import REPO_ROOT

OURS = ("service", "workers")  # the folders whose lines a synchronisation is charged to


@dataclass(frozen=True)
class Syncs:
    """The host synchronisations of one job, by the line of our code that made them."""

    steps: int
    flushes_and_epochs: int
    sites: Counter[str] | None  # None: not counted (only CUDA reports them)

    @property
    def per_step(self) -> bool:
        """Whether some line synchronised more often than once per flush or epoch."""
        return self.sites is None or any(n > self.flushes_and_epochs for n in self.sites.values())

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

    def record(message: Warning | str, *_args: object, **_kwargs: object) -> None:
        if "synchroniz" in str(message):
            sites[our_caller()] += 1  # called while the warning is raised: the stack is the op's

    cuda = device.type == "cuda"
    with warnings.catch_warnings():  # restores showwarning too
        warnings.simplefilter("always")
        warnings.showwarning = record
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield sites
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
