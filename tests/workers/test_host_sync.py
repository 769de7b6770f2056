"""No per-step host synchronisation: the loop and the reporter copy to the host per flush only.

On a GPU every ``.item()``/``.tolist()``/``float(tensor)`` waits for the device to drain; a
training step must not make one. Checked on the CPU by counting those calls on tensors while
the worker's real loop and reporter run a job.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from sqlalchemy.orm import Session, sessionmaker
from torch.overrides import TorchFunctionMode

from service import repository
from service.clock import utcnow
from service.schemas import JobCreate
from tests.support import SMALL_TEST, SMALL_TRAIN
from workers.data import load_mnist
from workers.progress import Claim, Limits, Reporter
from workers.train import train

HOST_COPIES = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__bool__,
    torch.Tensor.cpu,
    torch.Tensor.numpy,
}


class CountHostCopies(TorchFunctionMode):
    """Counts tensor methods that copy a value to the host (a sync on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if func in HOST_COPIES:
            self.calls[func.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_host_copies_do_not_grow_with_the_steps(
    sessions: sessionmaker[Session], small_mnist: Path, tmp_path: Path
) -> None:
    epochs, batch_size = 2, 16
    params = JobCreate(
        epochs=epochs, batch_size=batch_size, trainset_size=SMALL_TRAIN, testset_size=SMALL_TEST
    )
    with sessions.begin() as session:
        job = repository.create_job(session, params, max_attempts=3, now=utcnow())
    with sessions.begin() as session:
        claimed = repository.claim_job(
            session, worker_id="w", lease_s=60, device="cpu", now=utcnow()
        )
        assert claimed is not None
    reporter = Reporter(
        claim=Claim(job.id, 1, "w"),
        params=params,
        sessions=sessions,
        limits=Limits(lease_s=60, flush_interval_s=3600),  # flushes at each epoch's end only
        stop=threading.Event(),
        checkpoint_dir=tmp_path,
        show_progress=False,
    )
    data = load_mnist(small_mnist, device=torch.device("cpu"), download=False)
    counter = CountHostCopies()
    with counter:
        train(params, data, torch.device("cpu"), 0, reporter)
    steps = epochs * SMALL_TRAIN // batch_size
    assert reporter.steps_per_epoch * epochs == steps == 80
    # One copy of the buffered losses per flush and one accuracy per epoch: 2 per epoch.
    assert sum(counter.calls.values()) <= 2 * epochs, counter.calls
    with sessions() as session:
        assert len(repository.read_steps(session, job.id, after_step=0, limit=1000)) == steps
