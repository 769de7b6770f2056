"""The training benchmark's three loops on small data: same seed, floor and worker agree."""

from __future__ import annotations

from pathlib import Path

import torch
from sqlalchemy.orm import Session, sessionmaker

from benchmarks.floor import floor_train
from benchmarks.jobs import run_one_job
from benchmarks.tutorial import tutorial_data, tutorial_train
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
