"""An in-process app (real migrated database, real lifespan), a client, a real trained model."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from service.api.app import create_app
from service.clock import utcnow
from service.schemas import JobCreate
from service.settings import Settings
from service.status import JobStatus
from service.store import job_repo
from service.store.engines import make_engine, make_sessionmaker
from service.store.tables import Job
from tests.support import SMALL_TEST, SMALL_TRAIN, api_process, app_settings, local_env
from workers.worker import Worker


@pytest.fixture
def fast_lanes(request: pytest.FixtureRequest) -> bool:
    """Whether the app answers plain predictions and polls in its fast lanes (the default), or
    leaves them to the routes; ``BOTH_WAYS`` runs a test each way."""
    return bool(getattr(request, "param", True))


# The tests of the routes the fast lanes stand in front of run both ways: the answers must not
# depend on who gives them.
BOTH_WAYS = pytest.mark.parametrize(
    "fast_lanes", [True, False], ids=["lanes", "routes"], indirect=True
)


@pytest.fixture
def api_settings(settings: Settings, fast_lanes: bool) -> Settings:
    return settings.model_copy(update={"fast_lanes": fast_lanes})


@pytest.fixture
def client(api_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(api_settings)) as client:
        yield client


def train_job(client: TestClient, sessions: sessionmaker[Session], settings: Settings) -> str:
    """Queue a job through the API and train it with a real worker (the generated digits)."""
    body = {"epochs": 2, "trainset_size": SMALL_TRAIN, "testset_size": SMALL_TEST, "seed": 3}
    job_id: str = client.post("/jobs", json=body).json()["id"]
    Worker(settings, sessions, show_progress=False).run(max_jobs=1)
    assert client.get(f"/jobs/{job_id}").json()["status"] == "succeeded"
    return job_id


@pytest.fixture
def trained(client: TestClient, sessions: sessionmaker[Session], api_settings: Settings) -> str:
    """The id of a job trained (by a real worker) on the generated digits."""
    return train_job(client, sessions, api_settings)


def train_in_database(settings: Settings, params: JobCreate) -> Job:
    """Queue a job straight in ``settings``' database and train it with a real worker; the job,
    succeeded."""
    engine = make_engine(settings.database_url)
    sessions = make_sessionmaker(engine)
    try:
        with sessions.begin() as session:
            job_id = job_repo.create_job(session, params, max_attempts=1, now=utcnow()).id
        Worker(settings, sessions, show_progress=False).run(max_jobs=1)
        with sessions() as session:
            job = session.get(Job, job_id)
        assert job is not None and job.status == JobStatus.SUCCEEDED, job and job.error
        return job
    finally:
        engine.dispose()


@contextmanager
def model_server(
    sqlite_url: str, small_mnist: Path, tmp_path: Path, *, epochs: int, **settings: str
) -> Iterator[tuple[subprocess.Popen[bytes], httpx.Client]]:
    """A real ``python -m service`` (``settings`` its MNIST_* settings) serving a model that a
    real worker trained on the generated digits before it started: the process and a client."""
    params = JobCreate(epochs=epochs, trainset_size=SMALL_TRAIN, testset_size=SMALL_TEST, seed=3)
    train_in_database(app_settings(sqlite_url, tmp_path, data_dir=small_mnist), params)
    env = local_env(sqlite_url, small_mnist, tmp_path, **settings)
    with api_process(env, tmp_path / "api.log") as served:
        yield served


@dataclass(frozen=True)
class TrainedModel:
    """A model a real worker trained on real MNIST, in a SQLite database of its own."""

    settings: Settings
    job_id: str
    accuracy: float  # its validation accuracy: the first ``testset_size`` test images


# The validation images: MNIST's test split is never trained on, and predicting these same
# images through the API must reproduce the accuracy the worker measured on them.
REAL_VALIDATION_IMAGES = 2000


@pytest.fixture(scope="session")
def real_model(
    real_mnist: Path, sqlite_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> TrainedModel:
    """One model trained once per test session (the tutorial's defaults, a few seconds on CPU)."""
    root = tmp_path_factory.mktemp("real-model")
    shutil.copy(sqlite_template, root / "mnist.db")
    settings = Settings(
        database_url=f"sqlite:///{root / 'mnist.db'}",
        data_dir=real_mnist,
        download=False,
        checkpoint_dir=root / "models",
        device="cpu",
        max_images_per_request=100,
        max_form_parts=128,
    )
    job = train_in_database(settings, JobCreate(seed=0, testset_size=REAL_VALIDATION_IMAGES))
    assert job.accuracy is not None
    return TrainedModel(settings, job.id, job.accuracy)
