"""Model versions and aliases on both backends: listing, paging, and which model answers."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from service import model_registry, repository
from service.clock import utcnow
from service.errors import Conflict, InvalidInput, NotFound
from service.models import Job, JobStatus
from service.schemas import JobCreate

MISSING = "0123456789abcdef0123456789abcdef"


def add_model(
    sessions: sessionmaker[Session], *, finished_ago_s: float, status: str = JobStatus.SUCCEEDED
) -> str:
    """A job in ``status`` that finished ``finished_ago_s`` seconds ago (with a checkpoint name)."""
    with sessions.begin() as session:
        job = repository.create_job(session, JobCreate(), max_attempts=3, now=utcnow())
        job.status = status
        if status in JobStatus.TERMINAL:
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
            model_registry.existing_checkpoint(session, tmp_path, model)
        (tmp_path / f"{model}-1.pt").write_bytes(b"weights")
        assert (
            model_registry.existing_checkpoint(session, tmp_path, model).read_bytes() == b"weights"
        )


def test_deleting_a_job_deletes_its_aliases(sessions: sessionmaker[Session]) -> None:
    model = add_model(sessions, finished_ago_s=0)
    with sessions() as session:
        model_registry.set_alias(session, "production", model)
    with sessions.begin() as session:
        session.delete(session.get(Job, model))
    with sessions() as session:
        assert model_registry.list_aliases(session).aliases == []
