"""Sweeps' expansion into trials (the one the API and the CLI run) and the domain's create,
cancel and delete rules, on both backends."""

from __future__ import annotations

import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import Engine, event, select, update
from sqlalchemy.orm import Session, sessionmaker

from service.clock import utcnow
from service.domain import sweeps
from service.domain.deletion import DeletedJob
from service.errors import Conflict, InvalidInput, TooManyRequests
from service.schemas import JobCreate
from service.schemas.sweeps import MAX_FIELD_VALUES, SweepCreate, SweepField, SweepRead, expand
from service.status import JobStatus, SweepStatus
from service.store import job_repo, model_repo
from service.store.tables import Job

T = TypeVar("T")
LIMITS: dict[str, int] = {
    "max_trials": 256,
    "max_attempts": 1,
    "max_queued": 1000,
    "max_steps": 1_000_000,
}


def spec(**body: Any) -> SweepCreate:
    return SweepCreate.model_validate(body)


def refusal(body: dict[str, Any], max_trials: int = 256) -> InvalidInput:
    with pytest.raises(InvalidInput) as caught:
        expand(spec(**body), max_trials=max_trials)
    return caught.value


def test_the_sweep_fields_are_the_job_fields() -> None:
    assert set(typing.get_args(SweepField)) == set(JobCreate.model_fields)


def test_a_grid_is_every_combination_in_order() -> None:
    trials = expand(
        spec(params={"epochs": 1}, grid={"learning_rate": [0.001, 0.002], "seed": [0, 1, 2]}),
        max_trials=256,
    )
    assert [(t.learning_rate, t.seed) for t in trials] == [
        (lr, seed) for lr in (0.001, 0.002) for seed in (0, 1, 2)
    ]
    assert {t.epochs for t in trials} == {1}


def test_a_random_search_is_reproducible_by_its_seed() -> None:
    body = {
        "random": {
            "trials": 20,
            "seed": 7,
            "space": {
                "learning_rate": {"log_uniform": [1e-4, 1e-1]},
                "batch_size": {"choice": [32, 64, 128]},
                "epochs": {"int_uniform": [1, 3]},
                "max_runtime_s": {"uniform": [10, 20]},
            },
        }
    }
    first, again = expand(spec(**body), max_trials=256), expand(spec(**body), max_trials=256)
    assert first == again and len(first) == 20
    assert all(1e-4 <= t.learning_rate <= 1e-1 for t in first)
    assert {t.batch_size for t in first} <= {32, 64, 128}
    assert {t.epochs for t in first} <= {1, 2, 3}
    body["random"]["seed"] = 8
    assert expand(spec(**body), max_trials=256) != first


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"grid": {"learning_rate": [0.001, 2]}}, ["grid", "learning_rate", 1]),
        ({"grid": {"epochs": [1, 0]}}, ["grid", "epochs", 1]),
        ({"grid": {"seed": [1, "2"]}}, ["grid", "seed", 1]),
        # The same value twice: its trials trained twice (0.001 and 1e-3 are one value).
        ({"grid": {"learning_rate": [0.001, 0.002, 1e-3]}}, ["grid", "learning_rate", 2]),
        ({"grid": {"epochs": [2, 2.0]}}, ["grid", "epochs", 1]),
        (
            {"random": {"trials": 2, "space": {"batch_size": {"choice": [64, 10_000]}}}},
            ["random", "space", "batch_size", "choice", 1],
        ),
        (
            {"random": {"trials": 2, "space": {"learning_rate": {"uniform": [0, 0.1]}}}},
            ["random", "space", "learning_rate", "uniform", 0],
        ),
        (
            {"random": {"trials": 2, "space": {"epochs": {"uniform": [1, 3]}}}},
            ["random", "space", "epochs", "uniform"],
        ),
    ],
)
def test_a_value_no_job_may_have_is_named(body: dict[str, Any], where: list[Any]) -> None:
    error = refusal(body)
    assert error.details is not None and error.details[0]["loc"] == ["body", *where]
    named = ".".join(p for p in where if isinstance(p, str))
    assert error.message.startswith(named)
    if isinstance(where[-1], int):
        assert f"{named}[{where[-1]}]" in error.message


def test_too_many_trials_are_refused_before_any_is_made() -> None:
    grid = {name: list(range(1, 11)) for name in ("epochs", "batch_size", "trainset_size")}
    error = refusal({"grid": grid}, max_trials=256)
    assert "1000 trials, at most 256 (MNIST_MAX_SWEEP_TRIALS)" in error.message
    assert error.details is not None and error.details[0]["loc"] == ["body", "grid"]
    error = refusal({"random": {"trials": 300, "space": {"seed": {"int_uniform": [0, 9]}}}})
    assert error.details is not None and error.details[0]["loc"] == ["body", "random", "trials"]


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"grid": {}}, ("grid",)),
        ({"grid": {"learning_rate": []}}, ("grid", "learning_rate")),
        ({"grid": {"lr": [0.1]}}, ("grid", "lr", "[key]")),
        ({"random": {"trials": 1, "space": {}}}, ("random", "space")),
        ({"random": {"trials": 1, "space": {"seed": {}}}}, ("random", "space", "seed")),
        ({"random": {"trials": 1, "space": {"seed": {"int_uniform": [3, 1]}}}}, None),
        ({}, ()),
        ({"grid": {"seed": [1]}, "random": {"trials": 1, "space": {"seed": {}}}}, None),
        ({"grid": {"seed": [1]}, "promote": "no spaces"}, ("promote",)),
        # A field's values are bounded: a choice of millions took 19 s and filled every listing.
        (
            {"random": {"trials": 1, "space": {"seed": {"choice": [1] * (MAX_FIELD_VALUES + 1)}}}},
            ("random", "space", "seed", "choice"),
        ),
        ({"grid": {"seed": list(range(MAX_FIELD_VALUES + 1))}}, ("grid", "seed")),
    ],
)
def test_the_shape_of_a_sweep_is_checked_by_its_model(
    body: dict[str, Any], loc: tuple[str, ...] | None
) -> None:
    with pytest.raises(ValueError) as caught:  # pydantic's ValidationError
        SweepCreate.model_validate(body)
    if loc is not None:
        assert loc in [tuple(e["loc"]) for e in caught.value.errors()]  # type: ignore[attr-defined]


def trial_rows(sessions: sessionmaker[Session], sweep_id: str) -> list[Job]:
    with sessions() as session:
        stmt = select(Job).where(Job.sweep_id == sweep_id).order_by(Job.created_at, Job.id)
        return list(session.scalars(stmt))


def test_create_queues_every_trial_in_order(sessions: sessionmaker[Session]) -> None:
    body = spec(params={"epochs": 1}, grid={"seed": [5, 3, 9, 1]}, promote="best")
    with sessions() as session:
        made = sweeps.create(session, body, **LIMITS)
    assert made.status is SweepStatus.RUNNING and made.promote == "best"
    assert [t.params.seed for t in made.trials] == [5, 3, 9, 1]
    assert made.trials_by_status[JobStatus.QUEUED] == 4 and made.best is None
    rows = trial_rows(sessions, made.id)
    assert [r.seed for r in rows] == [5, 3, 9, 1]
    assert all(r.status == JobStatus.QUEUED and r.max_attempts == 1 for r in rows)


def executed(engine: Engine, work: Callable[[], T]) -> tuple[T, list[str]]:
    """What ``work`` returned, and the SQL statements it sent."""
    statements: list[str] = []

    def before(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", before)
    try:
        return work(), statements
    finally:
        event.remove(engine, "before_cursor_execute", before)


def test_create_inserts_its_trials_in_bulk(engine: Engine, sessions: sessionmaker[Session]) -> None:
    """A flush per trial: 10,000 trials held the write lock 7-10 s."""

    def create() -> SweepRead:
        with sessions() as session:
            return sweeps.create(session, spec(grid={"seed": list(range(100))}), **LIMITS)

    made, statements = executed(engine, create)
    inserts = [s for s in statements if s.startswith("INSERT INTO jobs")]
    assert len(made.trials) == 100
    assert len(inserts) <= 2, f"{len(inserts)} INSERTs for 100 trials"


def test_a_trial_is_the_row_its_parameters_make_as_a_job(sessions: sessionmaker[Session]) -> None:
    """Trials inserted in bulk are the rows ``POST /jobs`` makes (but for their sweep, their
    ids and their times, a microsecond apart in their order)."""
    body = spec(params={"epochs": 2, "trainset_size": 640}, grid={"seed": [7, 8, 9]})
    with sessions() as session:
        made = sweeps.create(session, body, **{**LIMITS, "max_attempts": 3})
        alone = job_repo.create_job(
            session, body.params.model_copy(update={"seed": 9}), max_attempts=3, now=utcnow()
        )
        session.commit()
    rows = trial_rows(sessions, made.id)
    assert [r.created_at - rows[0].created_at for r in rows] == [
        i * sweeps.TRIAL_SPACING for i in range(3)
    ]
    assert [r.id for r in rows] == [t.job_id for t in made.trials]
    mine = ("id", "created_at", "sweep_id")
    columns = [c.key for c in Job.__table__.columns if c.key not in mine]
    with sessions() as session:
        job = session.get_one(Job, alone.id)
    assert {c: getattr(rows[2], c) for c in columns} == {c: getattr(job, c) for c in columns}


def test_the_queue_cap_counts_every_trial(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        sweeps.create(session, spec(grid={"seed": [1, 2, 3]}), **{**LIMITS, "max_queued": 5})
        with pytest.raises(TooManyRequests) as caught:
            sweeps.create(session, spec(grid={"seed": [1, 2, 3]}), **{**LIMITS, "max_queued": 5})
        assert caught.value.headers["Retry-After"] == "30"
        assert "these 3 would make 6" in caught.value.message
    with sessions() as session:
        assert len(session.scalars(select(Job)).all()) == 3


def test_a_trial_over_the_steps_budget_is_named(sessions: sessionmaker[Session]) -> None:
    body = spec(params={"trainset_size": 640, "batch_size": 64}, grid={"epochs": [1, 5]})
    with sessions() as session, pytest.raises(InvalidInput) as caught:
        sweeps.create(session, body, **{**LIMITS, "max_steps": 20})
    assert caught.value.message.startswith("grid: trial 1 (5 epochs")
    assert caught.value.details is not None and caught.value.details[0]["trial"] == 1


def test_cancel_and_delete_follow_the_jobs_rules(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    with sessions() as session:
        made = sweeps.create(session, spec(grid={"seed": [1, 2]}), **LIMITS)
        with pytest.raises(Conflict, match="cancel it first"):
            sweeps.delete(session, tmp_path, made.id)
        session.rollback()
        cancelled = sweeps.cancel(session, made.id)
        assert cancelled.status is SweepStatus.CANCELLED and cancelled.finished_at is not None
        assert {t.status for t in cancelled.trials} == {JobStatus.CANCELLED}
        with pytest.raises(Conflict, match="already ended"):
            sweeps.cancel(session, made.id)
        session.rollback()
        deleted = sweeps.delete(session, tmp_path, made.id)
    assert sorted(d.job_id for d in deleted) == sorted(t.job_id for t in made.trials)
    assert trial_rows(sessions, made.id) == []


def test_a_trial_gone_before_its_sweeps_delete_is_skipped(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """Its row gone (deleted alone, by an older server's ``DELETE /jobs/{trial}``), the rest
    go; a delete once listed the trials and then locked each, and answered 404 on PostgreSQL
    for one that went in between: now the listing is the lock."""
    with sessions() as session:
        made = sweeps.create(session, spec(grid={"seed": [1, 2]}), **LIMITS)
        sweeps.cancel(session, made.id)
        job_repo.delete_job(session, made.trials[0].job_id)
        session.commit()
        deleted = sweeps.delete(session, tmp_path, made.id)
    assert [d.job_id for d in deleted] == [made.trials[1].job_id]
    assert trial_rows(sessions, made.id) == []


def ended_sweep(sessions: sessionmaker[Session], trials: int) -> list[str]:
    """A cancelled sweep's id, then its trials' ids in order."""
    with sessions() as session:
        made = sweeps.create(session, spec(grid={"seed": list(range(trials))}), **LIMITS)
        sweeps.cancel(session, made.id)
    return [made.id, *(t.job_id for t in made.trials)]


def test_deleting_a_sweep_takes_a_few_statements_whatever_its_trials(
    engine: Engine, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """A lock, an alias query and a delete per trial: 24 s for 10,000 trials."""
    sweep_id, *trials = ended_sweep(sessions, 100)

    def delete() -> list[DeletedJob]:
        with sessions() as session:
            return sweeps.delete(session, tmp_path, sweep_id)

    deleted, statements = executed(engine, delete)
    assert [d.job_id for d in deleted] == trials
    assert len(statements) <= 10, f"{len(statements)} statements for 100 trials"


def test_a_sweeps_delete_refuses_as_its_trials_checked_in_turn_would(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """The first trial (in the order queued) that may not go is named, by the first of the
    job's rules it breaks: checked all at once, the refusal is what it was one by one."""
    sweep_id, first, second, third = ended_sweep(sessions, 3)
    with sessions.begin() as session:
        model_repo.set_alias(session, name="b", job_id=third, now=utcnow())
        model_repo.set_alias(session, name="a", job_id=second, now=utcnow())
    with sessions() as session, pytest.raises(Conflict, match=f"'a' points at job {second}"):
        sweeps.delete(session, tmp_path, sweep_id)
    with sessions.begin() as session:  # not a state a sweep reaches: the rules' order alone
        session.execute(update(Job).where(Job.id == third).values(status=JobStatus.RUNNING))
    with sessions() as session, pytest.raises(Conflict, match=f"'a' points at job {second}"):
        sweeps.delete(session, tmp_path, sweep_id)
    with sessions.begin() as session:
        session.execute(update(Job).where(Job.id == first).values(status=JobStatus.RUNNING))
    with sessions() as session, pytest.raises(Conflict, match=f"job {first} is running"):
        sweeps.delete(session, tmp_path, sweep_id)
    assert len(trial_rows(sessions, sweep_id)) == 3


def test_deleting_a_sweep_lists_its_folder_once(
    sessions: sessionmaker[Session], tmp_path: Path, folder_scans: list[str]
) -> None:
    """Two globs per trial: a 256-trial sweep took 16 s beside 14,000 other files."""
    sweep_id, *trials = ended_sweep(sessions, 20)
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for trial in trials:
        (folder / f"{trial}-1-e1.resume.pt").write_bytes(b"")
        (folder / f".{trial}-1.pt.x.tmp").write_bytes(b"")
    (folder / "other.pt").write_bytes(b"")
    folder_scans.clear()
    with sessions() as session:
        sweeps.delete(session, folder, sweep_id)
    assert folder_scans == [str(folder)]
    assert [p.name for p in folder.iterdir()] == ["other.pt"]
