"""The tutorial's train and validate loop, on tensors that already sit on the device.

Read it beside the tutorial: the same model, optimiser, loss, batch order and evaluation. The
differences are only where the data comes from (one normalised tensor instead of a per-image
DataLoader), that each loss goes to ``report.step`` instead of ``loss.item()``, and that on a
GPU the step may be replayed from a CUDA graph (:mod:`workers.training.graphs`).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from service.ml import SimpleMLP
from service.schemas import JobCreate
from workers.data import Mnist, Split
from workers.resume import SavedState, TrainingState
from workers.training.graphs import GraphBackend, graphed


class TrainingReport(Protocol):
    """Where the loop sends its numbers (the worker's :class:`workers.reporting.Reporter`)."""

    def step(self, loss: torch.Tensor) -> None:
        """One optimiser step's loss, still on the device."""

    def epoch(self, epoch: int, accuracy: float, state: TrainingState) -> None:
        """The test accuracy after an epoch, and the state a retry would resume from."""


def make_optimizer(
    model: SimpleMLP, lr: float, device: torch.device, *, capturable: bool = False
) -> torch.optim.Adam:
    """Adam; the fused kernel where the device has one (same algorithm, fewer kernel launches).

    ``capturable`` keeps Adam's step counts on the device, as a CUDA graph of the step needs.
    """
    fused = device.type in ("cpu", "cuda")
    return torch.optim.Adam(model.parameters(), lr=lr, fused=fused, capturable=capturable)


def train_step(
    model: SimpleMLP, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """One step of the tutorial's loop; the loss is returned still on the device."""
    logits = model(images)
    loss = F.cross_entropy(logits, labels)
    optimizer.zero_grad()
    loss.backward()  # type: ignore[no-untyped-call]
    optimizer.step()
    return loss.detach()


@torch.inference_mode()
def evaluate(model: SimpleMLP, test: Split) -> float:
    """Accuracy: correct argmax / test size."""
    model.eval()
    correct = (model(test.images).argmax(dim=1) == test.labels).sum()
    return int(correct.item()) / len(test.labels)


def train(
    params: JobCreate,
    data: Mnist,
    device: torch.device,
    seed: int,
    report: TrainingReport,
    resume_from: SavedState | None = None,
    graphs: GraphBackend | None = None,
) -> SimpleMLP:
    """Train a SimpleMLP as the tutorial does and return it; ``resume_from`` continues a run.

    With ``graphs`` (:func:`workers.training.graphs.graph_backend`) full batches replay a
    captured step.
    """
    torch.manual_seed(seed)
    shuffle = torch.Generator(device=device).manual_seed(seed)
    trainset = data.train.first(params.trainset_size, "trainset_size")
    testset = data.test.first(params.testset_size, "testset_size")
    n, batch_size = params.trainset_size, params.batch_size

    model = SimpleMLP().to(device)
    # A captured CUDA step needs Adam's step counts on the card (a stand-in backend does not).
    capturable = graphs is not None and device.type == "cuda"
    optimizer = make_optimizer(model, params.learning_rate, device, capturable=capturable)
    state = TrainingState(model, optimizer, shuffle)
    done_epochs = state.restore(resume_from) if resume_from is not None else 0

    def eager_step(batch: torch.Tensor) -> torch.Tensor:
        return train_step(model, optimizer, trainset.images[batch], trainset.labels[batch])

    step = graphed(
        eager_step,
        batch_size=batch_size,
        device=device,
        model=model,
        optimizer=optimizer,
        backend=graphs,
    )
    for epoch in range(done_epochs + 1, params.epochs + 1):
        model.train()
        order = torch.randperm(n, generator=shuffle, device=device)  # reshuffled every epoch
        for start in range(0, n, batch_size):
            batch = order[start : start + batch_size]
            report.step(step(batch))
        report.epoch(epoch, evaluate(model, testset), state)
    return model
