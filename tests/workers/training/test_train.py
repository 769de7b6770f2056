"""The training loop keeps the tutorial's semantics and is reproducible with a seed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from service.schemas import JobCreate
from tests.workers.reports import DiesAfterFirstEpoch, Recorder
from workers.data import load_mnist
from workers.resume import load_state
from workers.training.train import evaluate, make_optimizer, train

CPU = torch.device("cpu")


def test_one_loss_per_step_and_one_accuracy_per_epoch(small_mnist: Path) -> None:
    data = load_mnist(small_mnist, device=CPU, download=False)
    params = JobCreate(epochs=2, batch_size=100, trainset_size=640, testset_size=200)
    report = Recorder()
    train(params, data, CPU, seed=0, report=report)
    assert len(report.losses) == 2 * 7  # ceil(640 / 100) steps per epoch
    assert [e for e, _ in report.accuracies] == [1, 2]
    assert report.accuracies[-1][1] > 0.9  # the generated digits are easy


def test_same_seed_same_losses_other_seed_other_losses(small_mnist: Path) -> None:
    data = load_mnist(small_mnist, device=CPU, download=False)
    params = JobCreate(epochs=1, batch_size=32, trainset_size=320, testset_size=100)
    runs = []
    for seed in (7, 7, 8):
        report = Recorder()
        train(params, data, CPU, seed=seed, report=report)
        runs.append(report.losses)
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_each_epoch_visits_every_image_once_in_a_new_order(
    small_mnist: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    orders: list[torch.Tensor] = []
    real_randperm = torch.randperm

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        order = real_randperm(*args, **kwargs)  # type: ignore[call-overload]
        orders.append(order.clone())
        return order  # type: ignore[no-any-return]

    monkeypatch.setattr(torch, "randperm", spy)
    data = load_mnist(small_mnist, device=CPU, download=False)
    params = JobCreate(epochs=3, trainset_size=640, testset_size=200)
    train(params, data, CPU, seed=1, report=Recorder())
    assert len(orders) == 3
    for order in orders:
        assert sorted(order.tolist()) == list(range(640))
    assert not torch.equal(orders[0], orders[1])


def test_asking_for_more_images_than_the_data_holds_is_a_clear_error(small_mnist: Path) -> None:
    data = load_mnist(small_mnist, device=CPU, download=False)
    with pytest.raises(ValueError, match="trainset_size is 10000 but the data set holds only 640"):
        train(JobCreate(), data, CPU, seed=0, report=Recorder())


def test_evaluate_is_correct_argmax_over_test_size(small_mnist: Path) -> None:
    data = load_mnist(small_mnist, device=CPU, download=False)
    test = data.test.first(50, "testset_size")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    with torch.no_grad():
        expected = (model(test.images).argmax(1) == test.labels).float().mean().item()
    assert evaluate(model, test) == pytest.approx(expected)  # type: ignore[arg-type]


def test_adam_uses_the_requested_learning_rate() -> None:
    from service.ml import SimpleMLP

    optimizer = make_optimizer(SimpleMLP(), 0.01, CPU)
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.param_groups[0]["lr"] == 0.01


def test_resuming_from_a_saved_epoch_continues_the_run_exactly(
    small_mnist: Path, tmp_path: Path
) -> None:
    data = load_mnist(small_mnist, device=CPU, download=False)
    params = JobCreate(epochs=3, batch_size=64, trainset_size=640, testset_size=200)
    whole = Recorder()
    train(params, data, CPU, seed=5, report=whole)

    first = DiesAfterFirstEpoch(tmp_path / "state.pt")
    with pytest.raises(KeyboardInterrupt):
        train(params, data, CPU, seed=5, report=first)
    rest = Recorder()
    torch.manual_seed(999)  # a new process: the global RNG is elsewhere; the state restores it
    train(params, data, CPU, seed=77, report=rest, resume_from=load_state(tmp_path / "state.pt"))

    assert first.losses + rest.losses == whole.losses
    assert first.accuracies + rest.accuracies == whole.accuracies
