"""The training benchmark's three loops on small data: same seed, floor and worker agree."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
import torch
from sqlalchemy.orm import Session, sessionmaker

from benchmarks import training
from benchmarks.floor import floor_label, floor_train
from benchmarks.jobs import JobRun, run_one_job
from benchmarks.tutorial import Trained, tutorial_data, tutorial_train
from service.schemas import JobCreate
from service.settings import Settings
from tests.support import SMALL_TEST, SMALL_TRAIN
from workers.data import load_mnist

SMALL = JobCreate(trainset_size=SMALL_TRAIN, testset_size=SMALL_TEST, epochs=2)


def test_the_floor_takes_the_workers_steps_exactly(
    small_mnist: Path, db_url: str, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    settings = Settings(
        database_url=db_url,
        data_dir=small_mnist,
        download=False,
        checkpoint_dir=tmp_path / "models",
        device="cpu",
    )
    data = load_mnist(small_mnist, device=torch.device("cpu"), download=False)
    floor = floor_train(data, SMALL, seed=3)
    run = run_one_job(
        settings, sessions, seed=3, trainset_size=SMALL_TRAIN, testset_size=SMALL_TEST, epochs=2
    )
    assert run.status == "succeeded"
    assert (run.steps_recorded, run.epochs_recorded) == (run.total_steps, 2) == (20, 2)
    assert run.accuracy == floor.accuracy > 0.9
    assert run.seconds > 0 and floor.seconds > 0

    unpersisted = run_one_job(
        settings,
        sessions,
        seed=3,
        persist=False,
        trainset_size=SMALL_TRAIN,
        testset_size=SMALL_TEST,
        epochs=2,
    )
    assert unpersisted.status == "succeeded"
    assert (unpersisted.steps_recorded, unpersisted.epochs_recorded) == (0, 0)


def test_the_tutorial_loop_reads_every_loss(small_mnist: Path) -> None:
    trained = tutorial_train(tutorial_data(small_mnist), SMALL, seed=0)
    assert len(trained.losses) == 2 * SMALL_TRAIN // 64
    assert trained.accuracy > 0.9


def test_every_round_runs_the_baseline_at_its_own_thread_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The floors' loop once reused the baseline's variable: from the second round on, the
    baseline ran at the last floor's count while its row named its own."""
    ran: list[tuple[str, int]] = []

    def timed(name: str) -> Callable[..., Trained]:
        def run(*_args: object, **_kwargs: object) -> Trained:
            ran.append((name, torch.get_num_threads()))
            return Trained(0.1, 0.9, [])

        return run

    class Stub(training.TrainingBench):
        def __init__(self) -> None:  # no workspace, no data: only the rounds' order counts
            self.settings = Settings(torch_threads="auto")
            self.tutorial = self.data = None  # type: ignore[assignment]

        def job(self, *, images: int, seed: int, persist: bool = True) -> JobRun:
            return cast(JobRun, SimpleNamespace(seconds=0.2, accuracy=0.9, flush_seconds=0.0))

    monkeypatch.setattr(training, "tutorial_train", timed("baseline"))
    monkeypatch.setattr(training, "floor_train", timed("floor"))
    threads_before = torch.get_num_threads()
    try:
        cases = Stub().measure(640, runs=3, baseline_runs=3, cold_runs=0, floor_counts=(1, 2))
    finally:
        torch.set_num_threads(threads_before)
    assert [n for name, n in ran if name == "baseline"] == [1, 1, 1]  # auto: one thread
    assert [n for name, n in ran if name == "floor"] == [1, 2] * 3
    assert [c.label for c in cases][1:3] == [floor_label(1), floor_label(2)]
