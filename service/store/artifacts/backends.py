"""Where checkpoints and training states live: the one place that knows (``MNIST_ARTIFACTS``).

``folder``: files in ``MNIST_CHECKPOINT_DIR``, written atomically before the job's row names
them; for one machine, or machines sharing that folder. ``database``: rows of the
``artifacts`` table, written in the same transaction as the job's row that names them, so
machines share nothing but the database.

Writing asks the configured backend (:func:`artifacts_for`); reading asks the name the job's
row holds, whatever the setting: ``db:<name>`` is a row, a plain name a file in the folder. A
model trained before the table existed (or under ``folder``) thus keeps loading from its file.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from sqlalchemy.orm import Session, sessionmaker

from service.ml import atomic_torch_save
from service.settings import Settings
from service.store.artifacts import repo as artifacts_repo
from service.store.artifacts.repo import CHECKPOINT, RESUME, Blob

DATABASE_PREFIX = "db:"
log = logging.getLogger("service.artifacts")

# What torch.load reads: a file in the folder, or a row's bytes.
Source = Path | io.BytesIO


def checkpoint_name(job_id: str, attempt: int) -> str:
    """The weights of an attempt that succeeded (ids are validated hex, never a path)."""
    return f"{job_id}-{attempt}.pt"


def resume_name(job_id: str, attempt: int, epoch: int) -> str:
    """An attempt's training state after ``epoch``: one per epoch, so that while the database
    cannot be written, later epochs never overwrite the one the job's row names."""
    return f"{job_id}-{attempt}-e{epoch}.resume.pt"


def _named(job_id: str, attempt: int, epoch: int | None) -> tuple[str, str]:
    """The name and kind of the weights (``epoch`` None) or of the state after ``epoch``."""
    if epoch is None:
        return checkpoint_name(job_id, attempt), CHECKPOINT
    return resume_name(job_id, attempt, epoch), RESUME


def in_database(ref: str) -> bool:
    """Whether the name a job's row holds is a row of ``artifacts`` (else a file)."""
    return ref.startswith(DATABASE_PREFIX)


def _file_name(ref: str) -> str:
    # Only a name is ever taken from the database, never a path.
    return Path(ref).name


def remove_job_files(folder: Path, job_id: str, checkpoint: str | None) -> None:
    """:func:`remove_jobs_files` for one job."""
    remove_jobs_files(folder, {job_id: checkpoint})


def remove_jobs_files(folder: Path, jobs: Mapping[str, str | None]) -> None:
    """Remove every file in ``folder`` of these deleted jobs (each id → the checkpoint its row
    named): their weights (the name the row gave, and the oldest layout's ``<id>.pt``), every
    attempt's training state, and any temporary file a write left behind
    (:func:`service.ml.atomic_torch_save`'s ``.<name>.*.tmp``).

    The folder is listed once for all of them: two globs per job made deleting many jobs (a
    sweep, retention's batch) cost their number times the folder's files (a 256-trial sweep
    took 16 s beside 14,000 files, 0.9 s in an empty folder).

    Names are built from the job ids (32 hex digits, checked before they reached the database)
    and base names only, so nothing outside ``folder`` is touched. A file that cannot be
    removed is logged, not raised: the job is already gone, and an orphan costs only disk.
    """
    owners: dict[str, str] = {}  # file name → the job whose file it is
    for job_id, checkpoint in jobs.items():
        owners[f"{job_id}.pt"] = job_id
        if checkpoint is not None and not in_database(checkpoint):
            owners[_file_name(checkpoint)] = job_id
    if jobs:
        owners.update(_listed_files_of(folder, jobs.keys()))
    for name, job_id in owners.items():
        path = folder / name
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("job %s deleted, but its file %s stays: %s", job_id, path, exc)


def _listed_files_of(folder: Path, job_ids: Iterable[str]) -> dict[str, str]:
    """The files in ``folder`` named as the jobs' attempts (``<id>-*.pt``) and temporary
    files (``.<id>*.tmp``) are, each with its job: one listing, each name matched by its
    prefix (the id's length, whatever it is) against the set of ids."""
    ids = set(job_ids)
    lengths = {len(job_id) for job_id in ids}
    found: dict[str, str] = {}
    try:
        with os.scandir(folder) as entries:
            names = [entry.name for entry in entries]
    except OSError:  # no folder (nothing was ever written there), as a glob finds nothing
        return found
    for name in names:
        for n in lengths:
            attempt = name.endswith(".pt") and name[n : n + 1] == "-"
            if attempt and name[:n] in ids:
                found[name] = name[:n]
            # ".tmp" after the id, not over it: the shortest is ".<id>.tmp"
            temporary = name[:1] == "." and name.endswith(".tmp") and len(name) >= n + 5
            if temporary and name[1 : n + 1] in ids:
                found[name] = name[1 : n + 1]
    return found


def _row_name(ref: str) -> str:
    return ref[len(DATABASE_PREFIX) :]


@dataclass(frozen=True)
class Saved:
    """An artifact written as far as its backend goes before a job's row names it."""

    ref: str  # what the job's row will hold
    blob: Blob | None  # bytes the naming transaction must store; None: already a durable file


class Artifacts(Protocol):
    """A backend that writes artifacts (reading goes by name: :class:`ArtifactSource`)."""

    def save(self, obj: object, *, job_id: str, attempt: int, epoch: int | None = None) -> Saved:
        """Serialise ``obj``: the weights (``epoch`` None) or the training state after
        ``epoch``. Slow (it copies the tensors): called off the training loop's way."""

    def discard(self, saved: Saved) -> None:
        """Forget what :meth:`save` wrote when no row will name it."""

    def keep_resume(self, job_id: str, keep: Collection[str]) -> None:
        """Delete the job's training states but those in ``keep`` (refs)."""


class FolderArtifacts:
    """Files in ``folder``, each written atomically (temporary file, fsync, rename)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def save(self, obj: object, *, job_id: str, attempt: int, epoch: int | None = None) -> Saved:
        """Write the file; the row may name it once this returns."""
        name, _ = _named(job_id, attempt, epoch)
        atomic_torch_save(obj, self.folder / name)
        return Saved(name, None)

    def discard(self, saved: Saved) -> None:
        """Delete the file."""
        (self.folder / _file_name(saved.ref)).unlink(missing_ok=True)

    def keep_resume(self, job_id: str, keep: Collection[str]) -> None:
        """Delete the job's other ``.resume.pt`` files."""
        names = {_file_name(ref) for ref in keep}
        for path in self.folder.glob(f"{job_id}-*.resume.pt"):
            if path.name not in names:
                path.unlink(missing_ok=True)


class DatabaseArtifacts:
    """Rows of ``artifacts``: :meth:`save` only serialises; the naming transaction inserts."""

    def save(self, obj: object, *, job_id: str, attempt: int, epoch: int | None = None) -> Saved:
        """The bytes, for the transaction that will name them."""
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        name, kind = _named(job_id, attempt, epoch)
        blob = Blob(job_id, name, kind, attempt, epoch, buffer.getvalue())
        return Saved(DATABASE_PREFIX + name, blob)

    def discard(self, saved: Saved) -> None:
        """Nothing was stored."""

    def keep_resume(self, job_id: str, keep: Collection[str]) -> None:
        """Nothing to do: storing a training state replaced the older ones in its transaction."""


def artifacts_for(settings: Settings) -> Artifacts:
    """The backend ``MNIST_ARTIFACTS`` chooses."""
    if settings.artifacts == "database":
        return DatabaseArtifacts()
    return FolderArtifacts(settings.checkpoint_dir)


class ArtifactSource:
    """Reads artifacts by the name a job's row holds: a row, or a file in ``folder``."""

    def __init__(self, folder: Path, sessions: sessionmaker[Session]) -> None:
        self.folder = folder
        self.sessions = sessions

    def where(self, ref: str) -> str:
        """Where ``ref`` is looked for, for the operator's log (never shown to clients)."""
        if in_database(ref):
            return f"the database's artifacts table (name {_row_name(ref)})"
        return str(self.folder / _file_name(ref))

    def open(self, ref: str) -> Source | None:
        """What ``torch.load`` reads for ``ref``, or None when it is gone. Blocks: call it
        from a thread, never on the event loop."""
        if not in_database(ref):
            return read(None, self.folder, ref)
        with self.sessions() as session:
            return read(session, self.folder, ref)


def read(session: Session | None, folder: Path, ref: str) -> Source | None:
    """What ``torch.load`` reads for ``ref`` (a row read through ``session``, or a file in
    ``folder``), or None when it is gone. Blocks."""
    if not in_database(ref):
        path = folder / _file_name(ref)
        return path if path.is_file() else None
    assert session is not None, "an artifact in the database is read through a session"
    data = artifacts_repo.data(session, _row_name(ref))
    return None if data is None else io.BytesIO(data)


def sizes(session: Session, folder: Path, refs: Iterable[str]) -> dict[str, int | None]:
    """The size in bytes of each of ``refs`` (None: gone); the rows' sizes read in one query."""
    refs = list(refs)
    stored = artifacts_repo.sizes(session, [_row_name(ref) for ref in refs if in_database(ref)])
    found: dict[str, int | None] = {}
    for ref in refs:
        in_rows = in_database(ref)
        found[ref] = stored.get(_row_name(ref)) if in_rows else _file_size(folder / _file_name(ref))
    return found


def _file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None
