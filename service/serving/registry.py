"""Models: every succeeded job is a version; aliases name versions; which one answers predict."""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread
from cachetools import TTLCache
from sqlalchemy.orm import Session, sessionmaker

from service.clock import utcnow
from service.domain.jobs import params_of
from service.errors import Conflict, NotFound, ServiceError
from service.ml import SimpleMLP, load_model
from service.schemas import AliasList, AliasRead, ModelList, ModelRead
from service.serving.single_flight import SingleFlight
from service.status import JobStatus
from service.store import job_repo, model_repo
from service.store.artifacts import backends as artifacts
from service.store.availability import unavailable_as_503
from service.store.tables import Job, ModelAlias

DEFAULT_ALIAS = "production"
# What a client is told of a weights file that is gone or damaged; where it should be and what
# went wrong is for the operator, in the log (a client learns no server path, no library's hint).
CHECKPOINT_UNUSABLE = "the checkpoint of this model is missing or unreadable"
log = logging.getLogger("service.models")
RESOLUTION_CACHE_ENTRIES = 1024  # distinct (job_id, alias) choices remembered per process
# A checkpoint that does not load is logged once a minute, not at each request for it: a client
# repeating one (the read-only key is enough) wrote an ERROR line each time, two with the fast
# lane's try before the route's. Each request still tries, so a file put back serves at once.
FAILURE_LOGGED_S = 60.0
_failures_logged: TTLCache[str, None] = TTLCache(maxsize=1024, ttl=FAILURE_LOGGED_S)
_failures_lock = threading.Lock()  # loads run in threads


@dataclass(frozen=True)
class ModelChoice:
    """Which model answers: by job id, by alias, or (neither) the default."""

    job_id: str | None = None
    alias: str | None = None


@dataclass(frozen=True)
class ResolvedModel:
    """The model a choice resolved to: its job and its weights file's name."""

    job_id: str
    checkpoint: str


def is_model(job: Job) -> bool:
    """A job is a model version once it has succeeded and recorded its weights file."""
    return job.status == JobStatus.SUCCEEDED and job.checkpoint is not None


def to_read(job: Job, size: int | None, aliases: list[str]) -> ModelRead:
    """A model as the API shows it (``size``: its weights' bytes, None when they are gone)."""
    assert job.finished_at is not None
    return ModelRead(
        job_id=job.id,
        params=params_of(job),
        accuracy=job.accuracy,
        created_at=job.created_at,
        finished_at=job.finished_at,
        device=job.device,
        checkpoint_bytes=size,
        aliases=aliases,
    )


def list_page(
    session: Session, checkpoint_dir: Path, *, limit: int, cursor: str | None
) -> ModelList:
    """A page of models, most recently finished first."""
    jobs, next_cursor = model_repo.list_models(session, limit=limit, cursor=cursor)
    aliases = model_repo.aliases_of(session, [job.id for job in jobs])
    sizes = _sizes(session, checkpoint_dir, jobs)
    return ModelList(
        models=[to_read(job, sizes[job.id], aliases.get(job.id, [])) for job in jobs],
        next=next_cursor,
    )


def _sizes(session: Session, checkpoint_dir: Path, jobs: list[Job]) -> dict[str, int | None]:
    """Each model's weights' size, by job id, wherever they are stored."""
    found = artifacts.sizes(session, checkpoint_dir, [str(job.checkpoint) for job in jobs])
    return {job.id: found[str(job.checkpoint)] for job in jobs}


def model_of(
    session: Session,
    job_id: str,
    *,
    not_a_model: type[ServiceError] = Conflict,
    lock: bool = False,
) -> Job:
    """The succeeded job ``job_id``: 404 when there is no such job, ``not_a_model`` (409 by
    default) when it has no trained model. ``lock`` holds its row (shared) until the
    transaction ends, so that it cannot be deleted meanwhile (:func:`job_repo.lock_job`)."""
    job = (
        job_repo.lock_job(session, job_id, shared=True)
        if lock
        else job_repo.get_job(session, job_id)
    )
    if job is None:
        raise NotFound(f"no job with id {job_id}")
    if not is_model(job):
        raise not_a_model(f"job {job_id} has no trained model (status {job.status})")
    return job


def model_or_404(session: Session, job_id: str) -> Job:
    """The succeeded job ``job_id``; 404 when there is no such job or it is not a model."""
    return model_of(session, job_id, not_a_model=NotFound)


def get(session: Session, checkpoint_dir: Path, job_id: str) -> ModelRead:
    """One model."""
    job = model_or_404(session, job_id)
    aliases = model_repo.aliases_of(session, [job.id]).get(job.id, [])
    return to_read(job, _sizes(session, checkpoint_dir, [job])[job.id], aliases)


def checkpoint_bytes(session: Session, checkpoint_dir: Path, job_id: str) -> bytes:
    """A model's weights, for download: read whole (a file, or its row) and checked to load as
    predict loads them (:func:`~service.ml.load_model`); 409 when they are gone or damaged.
    Blocks.

    Read whole here rather than streamed from the file afterwards: a job deleted after this
    check then cannot cut the download short or fail it with a missing file, and the answer
    needs no thread (nor the caller's database session) once it is sent. A few hundred KB.
    """
    job = model_or_404(session, job_id)
    assert job.checkpoint is not None
    source = artifacts.read(session, checkpoint_dir, job.checkpoint)
    try:
        data = None if source is None else _whole(source)
    except FileNotFoundError:  # deleted since it was found
        data = None
    loaded(None if data is None else io.BytesIO(data), f"{checkpoint_dir} ({job.checkpoint})")
    assert data is not None
    return data


def loaded(source: artifacts.Source | None, where: str) -> SimpleMLP:
    """The model in ``source`` (None: it is gone); 409 :data:`CHECKPOINT_UNUSABLE` when it is
    gone or does not load (damaged on disk), and where and why in the log: what predict's loads
    and the checkpoint's downloads tell alike."""
    if source is None:
        _log_failure(where, "cannot load a model: no checkpoint in %s", where)
        raise Conflict(CHECKPOINT_UNUSABLE)
    try:
        return load_model(source)
    except Exception as exc:  # torch raises many types for a damaged file
        _log_failure(where, "cannot load a model from %s: %s", where, exc)
        raise Conflict(CHECKPOINT_UNUSABLE) from exc


def _log_failure(where: str, message: str, *args: object) -> None:
    """``log.error`` unless a failure to load from ``where`` was logged within
    :data:`FAILURE_LOGGED_S`."""
    with _failures_lock:
        if where in _failures_logged:
            return
        _failures_logged[where] = None
    log.error(message, *args)


def _whole(source: artifacts.Source) -> bytes:
    return source.read_bytes() if isinstance(source, Path) else source.getvalue()


def _alias_read(alias: ModelAlias) -> AliasRead:
    return AliasRead(name=alias.name, job_id=alias.job_id, updated_at=alias.updated_at)


def list_aliases(session: Session) -> AliasList:
    """Every alias."""
    return AliasList(aliases=[_alias_read(a) for a in model_repo.list_aliases(session)])


def get_alias(session: Session, name: str) -> AliasRead:
    """One alias, or 404."""
    alias = model_repo.get_alias(session, name)
    if alias is None:
        raise NotFound(f"no model alias named {name!r}")
    return _alias_read(alias)


def set_alias(session: Session, name: str, job_id: str) -> AliasRead:
    """Point ``name`` at the model of ``job_id`` (404 unknown job, 409 not a model).

    The job's row stays locked until the commit: a delete of the job that comes first is
    waited for (then 404 here), one that comes second sees this alias (then 409 there).
    """
    model_of(session, job_id, lock=True)
    alias = model_repo.set_alias(session, name=name, job_id=job_id, now=utcnow())
    read = _alias_read(alias)
    session.commit()
    return read


def delete_alias(session: Session, name: str) -> None:
    """Remove an alias, or 404."""
    if not model_repo.delete_alias(session, name):
        raise NotFound(f"no model alias named {name!r}")
    session.commit()


def resolve(session: Session, *, job_id: str | None = None, alias: str | None = None) -> Job:
    """The job whose model answers a prediction.

    ``job_id`` names it; ``alias`` names an alias; with neither, the ``production`` alias if
    it is set, else the most recently finished succeeded job. 404 for an unknown job or
    alias, 409 when the job has no model, there is no model at all, or ``job_id`` and
    ``alias`` (both given) name different models.
    """
    if alias is not None:
        named = model_repo.get_alias(session, alias)
        if named is None:
            raise NotFound(f"no model alias named {alias!r}")
        if job_id is not None and job_id != named.job_id:
            raise Conflict(f"model alias {alias!r} points at job {named.job_id}, not at {job_id}")
        job_id = named.job_id
    elif job_id is None:
        default = model_repo.get_alias(session, DEFAULT_ALIAS)
        if default is not None:
            job_id = default.job_id
    if job_id is None:
        job = job_repo.latest_succeeded_job(session)
        if job is None or job.checkpoint is None:
            raise Conflict("no trained model yet: POST /jobs and wait for a job to succeed")
        return job
    return model_of(session, job_id)


def resolve_choice(session: Session, choice: ModelChoice) -> ResolvedModel:
    """:func:`resolve` for a :class:`ModelChoice`, reduced to what predict needs."""
    job = resolve(session, job_id=choice.job_id, alias=choice.alias)
    assert job.checkpoint is not None
    return ResolvedModel(job_id=job.id, checkpoint=job.checkpoint)


class ResolutionCache:
    """Resolved choices remembered for ``ttl_s`` seconds (0: not at all), in a
    ``cachetools.TTLCache`` of ``capacity`` entries (least recently used evicted).

    Resolving costs one to three queries, a prediction well under a millisecond: under load
    the queries would be most of predict's work. A succeeded job never changes, so what can
    go stale is only which job an alias or the default names: an alias written through this
    process clears the cache at once (:meth:`clear`); one written elsewhere, or a newer job
    becoming the default, is seen within ``ttl_s``. Errors (unknown alias, no model) are
    never remembered.
    """

    def __init__(
        self,
        ttl_s: float,
        *,
        capacity: int = RESOLUTION_CACHE_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self._entries: TTLCache[ModelChoice, ResolvedModel] = TTLCache(
            maxsize=capacity, ttl=ttl_s, timer=clock
        )
        # Lookups run on the event loop, clear() also in the thread pool (sync alias routes).
        self._lock = threading.Lock()
        # Bumped by clear(): a resolution read before an alias changed is not stored after it.
        self._generation = 0
        self.resolving: SingleFlight[ModelChoice, ResolvedModel] = SingleFlight()

    def get(self, choice: ModelChoice) -> ResolvedModel | None:
        """The remembered resolution of ``choice``, unless older than ``ttl_s``."""
        with self._lock:
            return self._entries.get(choice)

    def put(self, choice: ModelChoice, resolved: ResolvedModel, *, generation: int) -> None:
        """Remember ``resolved`` for ``ttl_s`` seconds, unless the cache was cleared since
        ``generation`` (:attr:`generation` when the resolution was read)."""
        with self._lock:
            if generation == self._generation:
                self._entries[choice] = resolved

    def clear(self) -> None:
        """Forget everything: an alias changed."""
        with self._lock:
            self._generation += 1
            self._entries.clear()

    @property
    def generation(self) -> int:
        """How many times the cache was cleared (see :meth:`put`)."""
        with self._lock:
            return self._generation

    async def resolve(self, sessions: sessionmaker[Session], choice: ModelChoice) -> ResolvedModel:
        """The cached resolution, or :func:`resolve_choice` in a read session (then remembered).

        When an entry expires under load, every request in flight misses at once: one of them
        reads the database (in a thread) and the others await its answer on the event loop.
        """
        resolved = self.get(choice)
        if resolved is None:
            resolved = await self.resolving.run(
                choice, lambda: self._read_and_keep(sessions, choice)
            )
        return resolved

    async def _read_and_keep(
        self, sessions: sessionmaker[Session], choice: ModelChoice
    ) -> ResolvedModel:
        generation = self.generation
        resolved = await anyio.to_thread.run_sync(_resolve_in_session, sessions, choice)
        self.put(choice, resolved, generation=generation)
        return resolved


def _resolve_in_session(sessions: sessionmaker[Session], choice: ModelChoice) -> ResolvedModel:
    # A ServiceError, so that predict's fast lane hands an outage to the route like any refusal.
    with unavailable_as_503("a model lookup"), sessions() as session:
        return resolve_choice(session, choice)
