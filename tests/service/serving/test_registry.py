"""Model versions and aliases on both backends: listing, paging, and which model answers."""

from __future__ import annotations

import io
import threading
import uuid
from datetime import timedelta
from pathlib import Path

import anyio
import pytest
import torch
from sqlalchemy.orm import Session, sessionmaker

from service.clock import utcnow
from service.errors import Conflict, InvalidInput, NotFound
from service.ml import SimpleMLP
from service.schemas import JobCreate
from service.serving import registry as model_registry
from service.status import TERMINAL, JobStatus
from service.store import job_repo
from service.store.artifacts import backends as artifacts
from service.store.tables import Job
from tests.support import FakeClock, wait_until

MISSING = "0123456789abcdef0123456789abcdef"


def add_model(
    sessions: sessionmaker[Session],
    *,
    finished_ago_s: float,
    status: JobStatus = JobStatus.SUCCEEDED,
) -> str:
    """A job in ``status`` that finished ``finished_ago_s`` seconds ago (with a checkpoint name)."""
    with sessions.begin() as session:
        job = job_repo.create_job(session, JobCreate(), max_attempts=3, now=utcnow())
        job.status = status
        if status in TERMINAL:
            job.finished_at = utcnow() - timedelta(seconds=finished_ago_s)
        if status == JobStatus.SUCCEEDED:
            job.checkpoint = f"{job.id}-1.pt"
            job.accuracy = 0.9
        return job.id


def resolve(sessions: sessionmaker[Session], **choice: str | None) -> str:
    with sessions() as session:
        return model_registry.resolve(session, **choice).id


def test_the_default_is_production_else_the_newest_model(sessions: sessionmaker[Session]) -> None:
    with pytest.raises(Conflict, match="no trained model yet"):
        resolve(sessions)
    add_model(sessions, finished_ago_s=0, status=JobStatus.FAILED)
    with pytest.raises(Conflict, match="no trained model yet"):
        resolve(sessions)
    old = add_model(sessions, finished_ago_s=60)
    new = add_model(sessions, finished_ago_s=10)
    assert resolve(sessions) == new

    with sessions() as session:
        model_registry.set_alias(session, "production", old)
    assert resolve(sessions) == old
    assert resolve(sessions, job_id=new) == new  # an explicit version wins over the alias
    with sessions() as session:
        model_registry.set_alias(session, "canary", new)
    assert resolve(sessions, alias="canary") == new
    assert resolve(sessions, alias="production") == old

    with sessions() as session:
        model_registry.delete_alias(session, "production")
    assert resolve(sessions) == new  # back to the newest model
    with pytest.raises(NotFound, match="no model alias named 'production'"):
        resolve(sessions, alias="production")


def test_unknown_and_untrained_choices_are_refused(sessions: sessionmaker[Session]) -> None:
    queued = add_model(sessions, finished_ago_s=0, status=JobStatus.QUEUED)
    with pytest.raises(NotFound, match=f"no job with id {MISSING}"):
        resolve(sessions, job_id=MISSING)
    with pytest.raises(Conflict, match="has no trained model"):
        resolve(sessions, job_id=queued)
    with pytest.raises(NotFound, match="no model alias"):
        resolve(sessions, alias="nope")
    with pytest.raises(NotFound, match="no model alias"):
        resolve(sessions, job_id=queued, alias="nope")


def test_aliases_point_only_at_models_and_can_be_moved(sessions: sessionmaker[Session]) -> None:
    first = add_model(sessions, finished_ago_s=20)
    second = add_model(sessions, finished_ago_s=10)
    running = add_model(sessions, finished_ago_s=0, status=JobStatus.RUNNING)
    with sessions() as session:
        with pytest.raises(Conflict, match="has no trained model"):
            model_registry.set_alias(session, "production", running)
        with pytest.raises(NotFound):
            model_registry.set_alias(session, "production", MISSING)
        created = model_registry.set_alias(session, "production", first)
        moved = model_registry.set_alias(session, "production", second)
    assert (created.job_id, moved.job_id) == (first, second)
    assert moved.updated_at >= created.updated_at
    with sessions() as session:
        assert model_registry.get_alias(session, "production").job_id == second
        assert [a.name for a in model_registry.list_aliases(session).aliases] == ["production"]
        with pytest.raises(NotFound):
            model_registry.delete_alias(session, "canary")
        with pytest.raises(NotFound):
            model_registry.get_alias(session, "canary")


def test_concurrent_puts_of_a_new_alias_all_succeed(sessions: sessionmaker[Session]) -> None:
    models = [add_model(sessions, finished_ago_s=i) for i in range(4)]
    barrier = threading.Barrier(len(models))
    errors: list[BaseException] = []

    def put(job_id: str) -> None:
        try:
            with sessions() as session:
                barrier.wait()
                model_registry.set_alias(session, "production", job_id)
        except BaseException as exc:  # noqa: BLE001 - collected, asserted below
            errors.append(exc)

    threads = [threading.Thread(target=put, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    assert resolve(sessions) in models


def test_models_are_listed_newest_first_in_pages(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    ids = [add_model(sessions, finished_ago_s=100 - i) for i in range(5)]  # ids[-1] is newest
    add_model(sessions, finished_ago_s=0, status=JobStatus.CANCELLED)
    (tmp_path / f"{ids[-1]}-1.pt").write_bytes(b"x" * 1234)
    with sessions() as session:
        model_registry.set_alias(session, "production", ids[-1])
        model_registry.set_alias(session, "a-b.c_9", ids[-1])

    seen: list[str] = []
    cursor = None
    with sessions() as session:
        while True:
            page = model_registry.list_page(session, tmp_path, limit=2, cursor=cursor)
            seen.extend(m.job_id for m in page.models)
            if page.next is None:
                break
            cursor = page.next
        assert seen == ids[::-1]
        first = model_registry.list_page(session, tmp_path, limit=1, cursor=None).models[0]
        assert first.checkpoint_bytes == 1234 and first.aliases == ["a-b.c_9", "production"]
        assert first.params == JobCreate() and first.accuracy == 0.9
        other = model_registry.get(session, tmp_path, ids[0])
        assert other.checkpoint_bytes is None and other.aliases == []
        with pytest.raises(InvalidInput, match="GET /models"):
            model_registry.list_page(session, tmp_path, limit=2, cursor="garbage!")


def test_a_job_that_is_not_a_model_is_404_under_models(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    running = add_model(sessions, finished_ago_s=0, status=JobStatus.RUNNING)
    model = add_model(sessions, finished_ago_s=0)
    with sessions() as session:
        with pytest.raises(NotFound, match="has no trained model \\(status running\\)"):
            model_registry.get(session, tmp_path, running)
        with pytest.raises(NotFound, match="no job with id"):
            model_registry.get(session, tmp_path, MISSING)
        with pytest.raises(Conflict, match="missing"):
            model_registry.checkpoint_bytes(session, tmp_path, model)
        (tmp_path / f"{model}-1.pt").write_bytes(b"weights")
        with pytest.raises(Conflict, match="missing or unreadable"):  # does not load
            model_registry.checkpoint_bytes(session, tmp_path, model)
        damaged = SimpleMLP().state_dict()
        damaged["net.3.bias"][4] = float("nan")  # loads, and answered null probabilities
        torch.save(damaged, tmp_path / f"{model}-1.pt")
        with pytest.raises(Conflict, match="missing or unreadable"):
            model_registry.checkpoint_bytes(session, tmp_path, model)
        weights = io.BytesIO()
        torch.save(SimpleMLP().state_dict(), weights)
        (tmp_path / f"{model}-1.pt").write_bytes(weights.getvalue())
        assert model_registry.checkpoint_bytes(session, tmp_path, model) == weights.getvalue()


def test_a_checkpoint_deleted_as_it_is_read_is_409(
    sessions: sessionmaker[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found, then deleted (its job deleted) before its bytes were read.
    model = add_model(sessions, finished_ago_s=0)
    monkeypatch.setattr(artifacts, "read", lambda *_: tmp_path / "gone.pt")
    with sessions() as session, pytest.raises(Conflict, match="missing or unreadable"):
        model_registry.checkpoint_bytes(session, tmp_path, model)


def test_deleting_a_job_deletes_its_aliases(sessions: sessionmaker[Session]) -> None:
    model = add_model(sessions, finished_ago_s=0)
    with sessions() as session:
        model_registry.set_alias(session, "production", model)
    with sessions.begin() as session:
        session.delete(session.get(Job, model))
    with sessions() as session:
        assert model_registry.list_aliases(session).aliases == []


# --- remembering resolutions -----------------------------------------------------------------


def cached_job(
    cache: model_registry.ResolutionCache,
    sessions: sessionmaker[Session],
    choice: model_registry.ModelChoice,
) -> str:
    return anyio.run(cache.resolve, sessions, choice).job_id


def test_a_resolution_is_remembered_for_its_ttl_then_read_again(
    sessions: sessionmaker[Session],
) -> None:
    clock = FakeClock()
    cache = model_registry.ResolutionCache(1.0, clock=clock)
    default = model_registry.ModelChoice()
    old = add_model(sessions, finished_ago_s=60)
    assert cached_job(cache, sessions, default) == old
    new = add_model(sessions, finished_ago_s=1)  # a worker finished a newer job elsewhere
    clock.now = 0.99
    assert cached_job(cache, sessions, default) == old  # within the TTL: remembered
    clock.now = 1.0
    assert cached_job(cache, sessions, default) == new  # expired: read again

    with sessions() as session:
        model_registry.set_alias(session, "production", old)
    assert cached_job(cache, sessions, default) == new  # an alias set elsewhere: not yet...
    cache.clear()  # ...and at once when set through this process (the route clears it)
    assert cached_job(cache, sessions, default) == old


def test_errors_are_never_remembered_and_ttl_0_remembers_nothing(
    sessions: sessionmaker[Session],
) -> None:
    cache = model_registry.ResolutionCache(60.0)
    with pytest.raises(Conflict, match="no trained model yet"):
        cached_job(cache, sessions, model_registry.ModelChoice())
    first = add_model(sessions, finished_ago_s=5)
    assert cached_job(cache, sessions, model_registry.ModelChoice()) == first

    never = model_registry.ResolutionCache(0.0)
    assert cached_job(never, sessions, model_registry.ModelChoice()) == first
    second = add_model(sessions, finished_ago_s=1)
    assert cached_job(never, sessions, model_registry.ModelChoice()) == second
    assert never.get(model_registry.ModelChoice()) is None


def test_a_resolution_read_before_a_clear_is_not_kept_after_it(
    sessions: sessionmaker[Session],
) -> None:
    cache = model_registry.ResolutionCache(60.0)
    choice = model_registry.ModelChoice(alias="production")
    resolved = model_registry.ResolvedModel(job_id=MISSING, checkpoint="x.pt")
    generation = cache.generation  # a request starts reading the alias...
    cache.clear()  # ...the alias is moved and the cache cleared...
    cache.put(choice, resolved, generation=generation)  # ...then the old answer arrives
    assert cache.get(choice) is None
    cache.put(choice, resolved, generation=cache.generation)
    assert cache.get(choice) == resolved


def test_the_oldest_resolutions_are_evicted_past_capacity() -> None:
    cache = model_registry.ResolutionCache(60.0, capacity=2)
    choices = [model_registry.ModelChoice(job_id=f"{i:032x}") for i in range(3)]
    for i, choice in enumerate(choices):
        cache.put(choice, model_registry.ResolvedModel(f"{i:032x}", "m.pt"), generation=0)
    assert cache.get(choices[0]) is None
    assert cache.get(choices[1]) is not None and cache.get(choices[2]) is not None


def test_concurrent_misses_read_the_database_once(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = add_model(sessions, finished_ago_s=1)
    cache = model_registry.ResolutionCache(60.0)
    reads: list[str] = []
    release = threading.Event()
    real = model_registry.resolve_choice

    def slow_resolve(
        session: Session, choice: model_registry.ModelChoice
    ) -> model_registry.ResolvedModel:
        reads.append("read")
        release.wait(timeout=30)  # every other request arrives while this one reads
        return real(session, choice)

    monkeypatch.setattr(model_registry, "resolve_choice", slow_resolve)
    choice = model_registry.ModelChoice()
    answers: list[str] = []

    async def ask() -> None:
        answers.append((await cache.resolve(sessions, choice)).job_id)

    async def main() -> None:
        async with anyio.create_task_group() as tasks:
            for _ in range(8):
                tasks.start_soon(ask)
            try:
                await wait_until(
                    lambda: cache.resolving.waiting(choice) == 8,
                    timeout_s=30,
                    what="8 waiting on 1 read",
                )
            finally:
                release.set()

    anyio.run(main)
    assert answers == [job_id] * 8
    assert reads == ["read"]


def test_a_checkpoint_that_does_not_load_is_logged_once_a_while_and_retried_each_time(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A client repeating a predict of a model whose file is gone wrote two ERROR lines a
    request (the fast lane's try, then the route's)."""
    where = str(tmp_path / f"gone-{uuid.uuid4().hex}.pt")  # not logged by an earlier test
    with caplog.at_level("ERROR", logger="service.models"):
        for _ in range(5):
            with pytest.raises(Conflict):
                model_registry.loaded(None, where)
    assert [r.getMessage() for r in caplog.records] == [
        f"cannot load a model: no checkpoint in {where}"
    ]
    path = tmp_path / "back.pt"  # each request still tries: a file put back serves at once
    torch.save(SimpleMLP().state_dict(), path)
    assert isinstance(model_registry.loaded(path, where), SimpleMLP)
