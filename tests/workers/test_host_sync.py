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

from benchmarks.syncs import synchronisations
from service.clock import utcnow
from service.ml import SimpleMLP, to_host
from service.schemas import JobCreate
from service.store import job_repo, metric_repo, queue_repo
from tests.support import NEEDS_CUDA, SMALL_TEST, SMALL_TRAIN
from workers.data import load_mnist
from workers.reporting import Claim, Limits, Reporter
from workers.resume import TrainingState
from workers.training.train import train

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
        job = job_repo.create_job(session, params, max_attempts=3, now=utcnow())
    with sessions.begin() as session:
        claimed = queue_repo.claim_job(
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
    # One copy of the buffered losses per flush (each epoch's, and the one that names the state
    # written after each epoch but the last) and one accuracy per epoch: at most 3 per epoch.
    assert sum(counter.calls.values()) <= 3 * epochs - 1, counter.calls
    reporter.drain()  # the last epoch's write may still be on the writer's thread
    with sessions() as session:
        assert len(metric_repo.read_steps(session, job.id, after_step=0, limit=1000)) == steps


def ours(sites: Counter[str]) -> Counter[str]:
    """The synchronisations charged to a line of the service's code."""
    return Counter({site: n for site, n in sites.items() if not site.startswith("outside")})


@NEEDS_CUDA
def test_saving_the_training_state_waits_for_the_card_once(tmp_path: Path) -> None:
    cuda = torch.device("cuda")
    model = SimpleMLP().to(cuda)
    optimizer = torch.optim.Adam(model.parameters(), capturable=True)
    model(torch.randn(8, 1, 28, 28, device=cuda)).sum().backward()
    optimizer.step()
    state = TrainingState(model, optimizer, torch.Generator(device=cuda).manual_seed(0))
    with synchronisations(cuda) as one:
        to_host([torch.ones(10, device=cuda)])
    with synchronisations(cuda) as sixteen:
        to_host([torch.full((10,), float(i), device=cuda) for i in range(16)])
    # Keep the card busy, then queue a write: the save must wait for both, or it reads stale
    # or half-copied weights (an idle card would finish every copy before anyone looked).
    torch.cuda._sleep(100_000_000)  # type: ignore[no-untyped-call]  # ~50 ms of card cycles
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with synchronisations(cuda) as saving:
        state.save(tmp_path / "state.pt", epoch=1)
    # Copied tensor by tensor, 16 tensors would wait 16 times; the state has 16 too (4 weights,
    # 3 Adam tensors each). On the card, torch sometimes delivers one more warning when the
    # counting switches its debug mode off, with none of our frames on the stack: not ours.
    assert ours(one) == ours(sixteen) == ours(saving), (one, sixteen, saving)
    assert sum(n for site, n in ours(one).items() if site.endswith("(to_host)")) == 1, one
    assert all(count.total() - ours(count).total() <= 1 for count in (one, sixteen, saving))
    saved = torch.load(tmp_path / "state.pt", weights_only=True)  # complete after the one wait
    for name, tensor in model.state_dict().items():
        assert torch.equal(saved["model"][name], tensor.cpu())
    for i, param in enumerate(model.parameters()):
        for key, value in optimizer.state[param].items():
            assert torch.equal(saved["optimizer"]["state"][i][key], value.cpu())
