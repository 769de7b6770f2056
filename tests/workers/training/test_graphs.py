"""The captured training step: the same training as the eager loop, on any device.

A CUDA graph replays the kernels it recorded on the tensors it recorded them with. On the CPU
``RerunOnReplay`` keeps that contract (a replay reruns the captured code on the same static
tensors and rewrites the captured output in place), so the parts this project writes around the
graph — the runs before the capture, the batch indices copied into a static tensor, the eager
last batch, the fallback — are checked here bit for bit against the eager loop. The last test
runs real CUDA graphs where a card is present.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from service.ml import SimpleMLP
from service.schemas import JobCreate
from tests.support import NEEDS_CUDA
from tests.workers.reports import DiesAfterFirstEpoch, Recorder
from workers.data import load_mnist
from workers.resume import TrainingState, load_state
from workers.training.graphs import WARMUP_STEPS, CudaGraphs, GraphedStep, graph_backend
from workers.training.packing import PackedJob, train_packed
from workers.training.train import make_optimizer, train, train_step

CPU = torch.device("cpu")
# 9 full batches of 64 and a last one of 24 in each epoch.
PARAMS = JobCreate(epochs=2, batch_size=64, trainset_size=600, testset_size=200)


class RerunOnReplay:
    """A CUDA graph's contract on the CPU: a replay reruns the capture, rewriting its output."""

    def __init__(self) -> None:
        self.warmups = 0
        self.replays = 0

    def warm_up(self, run: Callable[[], torch.Tensor], times: int) -> None:
        for _ in range(times):
            run()
            self.warmups += 1

    def capture(self, run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, Callable[[], None]]:
        output = run()  # a real capture runs nothing: GraphedStep must undo this step too

        def replay() -> None:
            self.replays += 1
            output.copy_(run())

        return output, replay


class LeavesAfter(Recorder):
    """A pack job's report that makes the job leave after its ``n``-th step."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def step(self, loss: torch.Tensor) -> None:
        super().step(loss)
        if len(self.losses) == self.n:
            raise RuntimeError("this job leaves the pack")


def pack_of(reports: list[Recorder]) -> list[PackedJob]:
    """Three jobs of other seeds and learning rates, reporting to ``reports``."""
    rates = (1e-3, 3e-3, 5e-4)
    return [
        PackedJob(PARAMS.model_copy(update={"learning_rate": lr}), seed, report)
        for seed, (lr, report) in enumerate(zip(rates, reports, strict=True))
    ]


class CannotCapture(RerunOnReplay):
    def capture(self, run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, Callable[[], None]]:
        run()
        raise RuntimeError("operation not permitted when stream is capturing")


def state_of(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        tensors += [v.clone() for v in optimizer.state.get(p, {}).values()]
    return tensors


def test_graphed_training_is_the_eager_training_bit_for_bit(small_mnist: Path) -> None:
    data = load_mnist(small_mnist, device=CPU, download=False)
    eager, graphed = Recorder(), Recorder()
    eager_model = train(PARAMS, data, CPU, seed=4, report=eager)
    backend = RerunOnReplay()
    graphed_model = train(PARAMS, data, CPU, seed=4, report=graphed, graphs=backend)

    assert graphed.losses == eager.losses
    assert graphed.accuracies == eager.accuracies
    for name, tensor in eager_model.state_dict().items():
        assert torch.equal(graphed_model.state_dict()[name], tensor), name
    assert backend.warmups == WARMUP_STEPS
    assert backend.replays == PARAMS.epochs * 9  # the batches of 24 ran eagerly


def test_resumed_graphed_training_continues_the_eager_run(
    small_mnist: Path, tmp_path: Path
) -> None:
    data = load_mnist(small_mnist, device=CPU, download=False)
    params = PARAMS.model_copy(update={"epochs": 3})
    whole = Recorder()
    train(params, data, CPU, seed=6, report=whole)

    path = tmp_path / "state.pt"
    first = DiesAfterFirstEpoch(path)
    with pytest.raises(KeyboardInterrupt):
        train(params, data, CPU, seed=6, report=first)
    rest = Recorder()
    train(
        params, data, CPU, seed=0, report=rest, resume_from=load_state(path), graphs=RerunOnReplay()
    )
    assert first.losses + rest.losses == whole.losses


@pytest.mark.parametrize("steps_before", [0, 2])
def test_the_runs_before_the_capture_leave_model_and_optimizer_as_they_were(
    small_mnist: Path, steps_before: int
) -> None:
    data = load_mnist(small_mnist, device=CPU, download=False)
    torch.manual_seed(0)
    model = SimpleMLP()
    optimizer = make_optimizer(model, 1e-3, CPU)
    images, labels = data.train.images, data.train.labels

    def step(batch: torch.Tensor) -> torch.Tensor:
        return train_step(model, optimizer, images[batch], labels[batch])

    for _ in range(steps_before):
        step(torch.arange(64))
    before = state_of(model, optimizer)
    GraphedStep(step, batch_size=64, device=CPU, model=model, optimizer=optimizer,
                backend=RerunOnReplay())  # fmt: skip
    after = state_of(model, optimizer)
    if steps_before == 0:
        # Adam's state exists now (the capture needs it), at the values Adam starts from.
        assert len(after) == len(before) + 3 * len(before)
        assert all(torch.count_nonzero(t) == 0 for t in after[len(before) :])
        after = after[: len(before)]
    assert len(after) == len(before)
    for a, b in zip(after, before, strict=True):
        assert torch.equal(a, b)


def test_a_step_that_cannot_be_captured_trains_eagerly_with_a_warning(
    small_mnist: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = load_mnist(small_mnist, device=CPU, download=False)
    eager, fallback = Recorder(), Recorder()
    train(PARAMS, data, CPU, seed=2, report=eager)
    with caplog.at_level(logging.WARNING, logger="workers"):
        train(PARAMS, data, CPU, seed=2, report=fallback, graphs=CannotCapture())
    assert fallback.losses == eager.losses
    assert "could not capture the training step" in caplog.text
    assert "operation not permitted when stream is capturing" in caplog.text


def test_a_graphed_pack_trains_as_the_eager_pack_bit_for_bit(small_mnist: Path) -> None:
    data = load_mnist(small_mnist, device=CPU, download=False)
    eager = [Recorder(), LeavesAfter(5), Recorder()]
    graphed = [Recorder(), LeavesAfter(5), Recorder()]
    train_packed(pack_of(eager), data, CPU)
    backend = RerunOnReplay()
    train_packed(pack_of(graphed), data, CPU, backend)
    for a, b in zip(graphed, eager, strict=True):
        assert (a.losses, a.accuracies) == (b.losses, b.accuracies)
    assert len(graphed[1].losses) == 5 and len(graphed[0].losses) == PARAMS.epochs * 10
    # Captured again when the job left (its rows' tensors are gone); the batches of 24 eager.
    assert backend.warmups == 2 * WARMUP_STEPS
    assert backend.replays == PARAMS.epochs * 9


def test_resuming_keeps_this_runs_optimizer_implementation(tmp_path: Path) -> None:
    model = SimpleMLP()
    saved_by = torch.optim.Adam(model.parameters(), lr=1e-3, fused=False)
    loss = model(torch.zeros(2, 1, 28, 28)).sum()
    loss.backward()
    saved_by.step()
    TrainingState(model, saved_by, torch.Generator()).save(tmp_path / "state.pt", 1)

    resumed_by = make_optimizer(model, 1e-3, CPU)
    assert (
        TrainingState(model, resumed_by, torch.Generator()).restore(
            load_state(tmp_path / "state.pt")
        )
        == 1
    )
    assert resumed_by.param_groups[0]["fused"] is True  # not the saved False
    first = next(iter(model.parameters()))
    assert torch.equal(resumed_by.state[first]["exp_avg"], saved_by.state[first]["exp_avg"])


def test_graphs_are_used_on_cuda_devices_when_enabled_only() -> None:
    assert graph_backend(CPU, True) is None
    assert graph_backend(torch.device("mps"), True) is None
    assert graph_backend(torch.device("cuda"), False) is None
    assert isinstance(graph_backend(torch.device("cuda"), True), CudaGraphs)


@NEEDS_CUDA
def test_cuda_graph_training_matches_eager_training_on_the_card(
    small_mnist: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cuda = torch.device("cuda")
    data = load_mnist(small_mnist, device=cuda, download=False)
    eager, graphed = Recorder(), Recorder()
    train(PARAMS, data, cuda, seed=3, report=eager)
    with caplog.at_level(logging.WARNING, logger="workers"):
        train(PARAMS, data, cuda, seed=3, report=graphed, graphs=CudaGraphs())
    assert "could not capture" not in caplog.text  # the graph ran, not the eager fallback
    # Capturable Adam computes its bias corrections on the card: the same sums, other roundings.
    torch.testing.assert_close(
        torch.tensor(graphed.losses), torch.tensor(eager.losses), rtol=1e-4, atol=1e-5
    )
    assert [e for e, _ in graphed.accuracies] == [1, 2]
    assert graphed.accuracies[-1][1] == pytest.approx(eager.accuracies[-1][1], abs=0.01)


@NEEDS_CUDA
def test_a_graphed_run_on_the_card_resumes_an_eager_one(
    small_mnist: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cuda = torch.device("cuda")
    data = load_mnist(small_mnist, device=cuda, download=False)
    params = PARAMS.model_copy(update={"epochs": 3})
    whole = Recorder()
    train(params, data, cuda, seed=8, report=whole)
    path = tmp_path / "state.pt"
    first = DiesAfterFirstEpoch(path)  # saved by eager (non-capturable) Adam
    with pytest.raises(KeyboardInterrupt):
        train(params, data, cuda, seed=8, report=first)
    rest = Recorder()
    with caplog.at_level(logging.WARNING, logger="workers"):
        train(
            params,
            data,
            cuda,
            seed=0,
            report=rest,
            resume_from=load_state(path),
            graphs=CudaGraphs(),
        )
    assert "could not capture" not in caplog.text
    torch.testing.assert_close(
        torch.tensor(first.losses + rest.losses), torch.tensor(whole.losses), rtol=1e-4, atol=1e-5
    )


@NEEDS_CUDA
def test_a_cuda_graph_pack_matches_the_eager_pack_on_the_card(
    small_mnist: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cuda = torch.device("cuda")
    data = load_mnist(small_mnist, device=cuda, download=False)
    eager = [Recorder(), LeavesAfter(5), Recorder()]
    graphed = [Recorder(), LeavesAfter(5), Recorder()]
    train_packed(pack_of(eager), data, cuda)
    with caplog.at_level(logging.WARNING, logger="workers"):
        train_packed(pack_of(graphed), data, cuda, CudaGraphs())
    assert "could not capture" not in caplog.text  # the graphs ran, not the eager fallback
    for a, b in zip(graphed, eager, strict=True):
        torch.testing.assert_close(
            torch.tensor(a.losses), torch.tensor(b.losses), rtol=1e-4, atol=1e-5
        )
        assert [e for e, _ in a.accuracies] == [e for e, _ in b.accuracies]
