"""Packed training: each job in a pack trains as it would alone, up to float rounding.

The tolerances come from measurement. The pack and a solo run start from the same weights, see
the same batches and apply the same Adam kernel, so they differ only in how the matrix products
and a few sums round (batched ``bmm`` against ``addmm``, a written-out backward against
autograd's). Over 3 epochs of 2,000 images (96 steps per job, lr up to 1e-2), on MNIST and on
the stand-in digits, a loss moved by at most 3.6e-7 (a few float32 steps at 1: the log-softmax
of logits near 1 rounds there, however small the loss) and by at most 1.7e-6 of itself where
above 1e-3; a final weight moved by at most 5.4e-6 (Adam makes every update about lr in size,
so an element whose gradient is near zero turns rounding into up to lr per step). The
tolerances sit several times above those. An accuracy may move by one test image, should
rounding flip a near-tie between two classes (none did).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from service.ml import SimpleMLP
from service.schemas import JobCreate
from tests.support import make_small_mnist
from tests.workers.reports import Recorder
from workers.data import Mnist, load_mnist
from workers.resume import TrainingState, load_state
from workers.training.packing import PackedJob, Unpackable, pack_key, train_packed
from workers.training.train import train

CPU = torch.device("cpu")
LOSS_RTOL, LOSS_ATOL = 1e-5, 2e-6  # measured 1.7e-6 and 3.6e-7: see the module's docstring
WEIGHT_ATOL = 5e-5  # measured 5.4e-6
TESTSET = 500
PARAMS = {"epochs": 3, "batch_size": 64, "trainset_size": 2000, "testset_size": TESTSET}
SEEDS_AND_RATES = [(0, 1e-3), (1, 3e-3), (2, 5e-4), (3, 1e-2)]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Mnist:
    """MNIST when MNIST_DATA_DIR names it, else stand-in digits of the same sizes."""
    root = os.environ.get("MNIST_DATA_DIR")
    if not root or not (Path(root) / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").exists():
        root = str(make_small_mnist(tmp_path_factory.mktemp("packing"), train=2000, test=TESTSET))
    return load_mnist(Path(root), device=CPU, download=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Train on one thread: on a shared machine, two threads that wait on each other make these
    tests minutes long. The pack and the solo runs compare at the same count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Leaves(Recorder):
    """Records, then raises at step ``at`` (1-based), as a cancelled job's report does."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def step(self, loss: torch.Tensor) -> None:
        """Record the loss; leave at the chosen step."""
        super().step(loss)
        if len(self.losses) == self.at:
            raise LookupError(f"left at step {self.at}")


class SavesFirstEpoch(Recorder):
    """Records, and saves the training state after epoch 1 to ``path``."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def epoch(self, epoch: int, accuracy: float, state: TrainingState) -> None:
        """Record; save after the first epoch."""
        super().epoch(epoch, accuracy, state)
        if epoch == 1:
            state.save(self.path, epoch)


def job(seed: int, lr: float, report: Recorder, **kwargs: object) -> PackedJob:
    return PackedJob(JobCreate(**PARAMS, learning_rate=lr), seed, report, **kwargs)  # type: ignore[arg-type]


def solo(data: Mnist, seed: int, lr: float, report: Recorder, **kwargs: object) -> SimpleMLP:
    params = JobCreate(**PARAMS, learning_rate=lr)
    return train(params, data, CPU, seed, report, **kwargs)  # type: ignore[arg-type]


class Run(NamedTuple):
    """Each job's report (which saved its state after epoch 1) and its outcome."""

    reports: list[SavesFirstEpoch]
    outcomes: list[SimpleMLP | Exception]


@pytest.fixture(scope="module")
def states(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("states")


@pytest.fixture(scope="module")
def alone(data: Mnist, states: Path) -> Run:
    """The jobs of SEEDS_AND_RATES, each trained alone."""
    reports = [SavesFirstEpoch(states / f"solo-{seed}.pt") for seed, _ in SEEDS_AND_RATES]
    models = [solo(data, s, lr, r) for (s, lr), r in zip(SEEDS_AND_RATES, reports, strict=True)]
    return Run(reports, list(models))


@pytest.fixture(scope="module")
def packed(data: Mnist, states: Path) -> Run:
    """The same jobs, trained as one pack."""
    reports = [SavesFirstEpoch(states / f"packed-{seed}.pt") for seed, _ in SEEDS_AND_RATES]
    jobs = [job(s, lr, r) for (s, lr), r in zip(SEEDS_AND_RATES, reports, strict=True)]
    return Run(reports, train_packed(jobs, data, CPU))


def epochs_after_the_first(report: Recorder, steps_per_epoch: int = 32) -> Recorder:
    rest = Recorder()
    rest.losses, rest.accuracies = report.losses[steps_per_epoch:], report.accuracies[1:]
    return rest


def assert_same_run(packed: Recorder, alone: Recorder) -> None:
    assert len(packed.losses) == len(alone.losses)
    torch.testing.assert_close(
        torch.tensor(packed.losses), torch.tensor(alone.losses), rtol=LOSS_RTOL, atol=LOSS_ATOL
    )
    assert [e for e, _ in packed.accuracies] == [e for e, _ in alone.accuracies]
    for (_, a), (_, b) in zip(packed.accuracies, alone.accuracies, strict=True):
        assert abs(a - b) <= 1 / TESTSET


def assert_same_weights(a: object, b: object) -> None:
    assert isinstance(a, SimpleMLP) and isinstance(b, SimpleMLP)  # each job's own model
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=WEIGHT_ATOL, msg=name)


def test_each_packed_job_trains_as_it_would_alone(packed: Run, alone: Run) -> None:
    assert len(packed.reports[0].losses) == 3 * 32  # ceil(2000 / 64): the last batch holds 16
    for k in range(len(SEEDS_AND_RATES)):
        assert_same_run(packed.reports[k], alone.reports[k])
        model = packed.outcomes[k]
        assert isinstance(model, SimpleMLP)  # the job's own model, unstacked
        assert_same_weights(model, alone.outcomes[k])
    # Different seeds and rates make different runs: the comparison above can tell them apart.
    assert packed.reports[0].losses[5] != pytest.approx(alone.reports[1].losses[5], rel=1e-3)


def test_a_pack_of_one_is_a_solo_run(data: Mnist, alone: Run) -> None:
    report = Recorder()
    seed, lr = SEEDS_AND_RATES[1]
    (model,) = train_packed([job(seed, lr, report)], data, CPU)
    assert_same_run(report, alone.reports[1])
    assert isinstance(model, SimpleMLP)
    assert_same_weights(model, alone.outcomes[1])


def test_a_job_that_leaves_stops_alone_and_the_others_do_not_change(
    data: Mnist, packed: Run
) -> None:
    reports = [Recorder(), Leaves(at=40), Recorder(), Leaves(at=96 + 1)]
    outcomes = train_packed(
        [job(s, lr, r) for (s, lr), r in zip(SEEDS_AND_RATES, reports, strict=True)], data, CPU
    )
    assert isinstance(outcomes[1], LookupError) and str(outcomes[1]) == "left at step 40"
    assert len(reports[1].losses) == 40 and len(reports[1].accuracies) == 1
    assert isinstance(outcomes[3], SimpleMLP)  # its last step came and went without leaving
    for k in (0, 2, 3):
        # Each job's rows are computed apart from the others': not one bit changes.
        assert reports[k].losses == packed.reports[k].losses
        assert reports[k].accuracies == packed.reports[k].accuracies


def test_when_every_job_leaves_the_pack_ends_with_their_errors(data: Mnist) -> None:
    outcomes = train_packed([job(0, 1e-3, Leaves(at=3)), job(1, 1e-3, Leaves(at=5))], data, CPU)
    assert [str(o) for o in outcomes] == ["left at step 3", "left at step 5"]


def test_a_packed_jobs_state_is_a_solo_runs_state(packed: Run, alone: Run) -> None:
    for mine_report, theirs_report in zip(packed.reports, alone.reports, strict=True):
        mine = torch.load(mine_report.path, weights_only=True)
        theirs = torch.load(theirs_report.path, weights_only=True)
        assert mine.keys() == theirs.keys()
        assert mine["epoch"] == theirs["epoch"] == 1
        assert mine["optimizer"]["param_groups"] == theirs["optimizer"]["param_groups"]
        assert torch.equal(mine["shuffle_rng"], theirs["shuffle_rng"])
        assert torch.equal(mine["torch_rng"], theirs["torch_rng"])
        for name, weights in mine["model"].items():
            torch.testing.assert_close(weights, theirs["model"][name], rtol=0, atol=WEIGHT_ATOL)
        for i, saved in mine["optimizer"]["state"].items():
            other = theirs["optimizer"]["state"][i]
            assert saved.keys() == other.keys() and torch.equal(saved["step"], other["step"])
            assert saved["exp_avg"].shape == other["exp_avg"].shape


def test_a_solo_run_resumes_from_a_packed_jobs_state(data: Mnist, packed: Run) -> None:
    rest = Recorder()
    torch.manual_seed(999)  # as a new process: the state restores the global RNG
    seed, lr = SEEDS_AND_RATES[3]
    solo(data, seed, lr, rest, resume_from=load_state(packed.reports[3].path))
    assert_same_run(rest, epochs_after_the_first(packed.reports[3]))


def test_a_pack_resumes_from_solo_runs_states(data: Mnist, alone: Run) -> None:
    reports = [Recorder(), Recorder()]
    resumed = [
        job(s, lr, r, resume_from=load_state(saved.path))
        for (s, lr), r, saved in zip(SEEDS_AND_RATES[:2], reports, alone.reports, strict=False)
    ]
    train_packed(resumed, data, CPU)
    for k, report in enumerate(reports):
        assert_same_run(report, epochs_after_the_first(alone.reports[k]))


def test_jobs_that_cannot_share_a_step_are_refused(data: Mnist) -> None:
    other = PackedJob(JobCreate(**{**PARAMS, "batch_size": 32}), 1, Recorder())
    with pytest.raises(Unpackable, match="jobs in one pack must share batch_size: 64 and 32"):
        train_packed([job(0, 1e-3, Recorder()), other], data, CPU)
    assert pack_key(other.params) != pack_key(JobCreate(**PARAMS))
    with pytest.raises(Unpackable, match="at least one job"):
        train_packed([], data, CPU)
