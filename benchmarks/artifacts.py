"""Checkpoints and training states saved and loaded each way: files (``MNIST_ARTIFACTS=folder``)
against rows of SQLite and of PostgreSQL (``database``).

A save is what a worker pays: serialising (and, for a file, fsync and rename; for a row, the
insert and the commit of its transaction). A load is what the API pays on a model cache miss
(read, then ``torch.load`` into a SimpleMLP), and what a retried job pays once to resume.
Predict never pays it twice: loaded models are cached.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from sqlalchemy.orm import sessionmaker

from benchmarks.report import Section
from benchmarks.result_service import database, postgres_reachable
from benchmarks.stats import Series, fmt
from service.clock import utcnow
from service.ml import SimpleMLP, load_model
from service.schemas import JobCreate
from service.store import job_repo
from service.store.artifacts import repo as artifacts_repo
from service.store.artifacts.backends import (
    Artifacts,
    ArtifactSource,
    DatabaseArtifacts,
    FolderArtifacts,
    Saved,
)
from service.store.engines import make_engine, make_sessionmaker
from workers.resume import TrainingState
from workers.training.train import make_optimizer

Commit = Callable[[Saved], None]  # what makes a save durable (a row's transaction)
LABELS = {"folder": "files (folder)", "sqlite": "SQLite rows", "postgresql": "PostgreSQL rows"}


Payload = tuple[object, int | None]  # what is saved, and after which epoch (None: weights)


def _payloads() -> dict[str, Payload]:
    """The weights (what predict loads) and a training state (what a retry resumes from)."""
    model = SimpleMLP()
    optimizer = make_optimizer(model, 1e-3, torch.device("cpu"))
    loss = model(torch.zeros(1, 1, 28, 28)).sum()
    loss.backward()
    optimizer.step()  # Adam's moments exist, as after a real epoch
    state = TrainingState(model, optimizer, torch.Generator().manual_seed(0))
    return {"weights": (model.state_dict(), None), "training state": (state.snapshot(1), 1)}


@contextmanager
def _store(
    kind: str, root: Path
) -> Iterator[tuple[Artifacts, ArtifactSource, Callable[..., None]]]:
    """A backend, what reads it, and how a save is committed (a row's transaction)."""
    if kind == "folder":
        folder = root / "models"
        # A file is durable once saved; the source's sessions are never used for one.
        yield FolderArtifacts(folder), ArtifactSource(folder, sessionmaker()), lambda _saved: None
        return
    with database(kind, root) as url:
        engine = make_engine(url)
        sessions = make_sessionmaker(engine)

        def commit(saved: Saved) -> None:
            assert saved.blob is not None
            with sessions.begin() as session:
                artifacts_repo.put(session, saved.blob, now=utcnow())

        try:
            yield DatabaseArtifacts(), ArtifactSource(root, sessions), commit
        finally:
            engine.dispose()


def _job(source: ArtifactSource) -> str:
    with source.sessions.begin() as session:
        return job_repo.create_job(session, JobCreate(), max_attempts=1, now=utcnow()).id


def _measure(
    store: Artifacts,
    source: ArtifactSource,
    commit: Commit,
    job_id: str,
    payload: Payload,
    runs: int,
) -> tuple[int, Series, Series, Series]:
    """The stored size, and the times of ``runs`` saves of ``payload`` (whole, and their part
    in the transaction that names the row), and of loading it back."""
    obj, epoch = payload
    saves, stores, loads = Series("save", "ms"), Series("store", "ms"), Series("load", "ms")
    size = 0
    for attempt in range(1, runs + 1):
        started = time.perf_counter()
        saved = store.save(obj, job_id=job_id, attempt=attempt, epoch=epoch)
        serialised = time.perf_counter()
        commit(saved)
        saves.add((time.perf_counter() - started) * 1000)
        stores.add((time.perf_counter() - serialised) * 1000)
        started = time.perf_counter()
        found = source.open(saved.ref)
        assert found is not None
        if epoch is None:
            load_model(found)
        else:
            torch.load(found, map_location="cpu", weights_only=True)
        loads.add((time.perf_counter() - started) * 1000)
        size = found.stat().st_size if isinstance(found, Path) else len(found.getvalue())
    return size, saves, stores, loads


def run_artifacts(section: Section, root: Path, *, runs: int) -> None:
    """Measure each way and write the section."""
    kinds = ["folder", "sqlite"]
    why_not = postgres_reachable()
    if why_not is None:
        kinds.append("postgresql")
    rows = []
    for kind in kinds:
        with _store(kind, root / kind) as (store, source, commit):
            job_id = _job(source) if kind != "folder" else "0" * 32
            for what, payload in _payloads().items():
                size, saves, stores, loads = _measure(store, source, commit, job_id, payload, runs)
                rows.append(
                    [
                        what,
                        LABELS[kind],
                        f"{size / 1024:,.0f} KiB",
                        fmt(saves.median, "ms"),
                        "—" if kind == "folder" else fmt(stores.median, "ms"),
                        fmt(loads.median, "ms"),
                    ]
                )
    section.para(
        f"`python -m benchmarks --only artifacts` (median of {runs} runs each). A save is what "
        "a worker pays once per epoch (the training state, in a thread of its own while the "
        "next epoch trains) and once per job (the weights): serialising, then the file's "
        "fsync and rename, or the row's insert and its transaction's commit. With rows, "
        "serialising stays in the state's thread; the insert rides the fenced flush that names "
        "the state (on the training thread, once per epoch) or the job's finish (once per "
        "job): the fifth column. A load is what "
        "the API pays on a model-cache miss (read, then `torch.load` into a SimpleMLP), once "
        "per model and process; predict's figures do not include it, as a cached model is "
        "never read again."
    )
    section.table(
        ["artifact", "stored as", "size", "save", "of which in the naming transaction", "load"],
        rows,
    )
    if why_not is not None:
        section.para(f"PostgreSQL was not measured: {why_not}.")
