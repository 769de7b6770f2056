"""Sweeps' expansion into trials (the one the API and the CLI run) and the domain's create,
cancel and delete rules, on both backends."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, select
from sqlalchemy.orm import Session, sessionmaker

from service.clock import utcnow
from service.domain import sweeps
from service.errors import Conflict, InvalidInput, TooManyRequests
from service.schemas import JobCreate
from service.schemas.sweeps import MAX_FIELD_VALUES, SweepCreate, SweepField, expand
from service.status import JobStatus, SweepStatus
from service.store import job_repo
from service.store.sweeps import repo as sweep_repo
from service.store.tables import Job

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


def test_create_inserts_its_trials_in_bulk(engine: Engine, sessions: sessionmaker[Session]) -> None:
    """A flush per trial: 10,000 trials held the write lock 7-10 s."""
    inserts: list[str] = []

    def before(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.startswith("INSERT INTO jobs"):
            inserts.append(statement)

    event.listen(engine, "before_cursor_execute", before)
    try:
        with sessions() as session:
            made = sweeps.create(session, spec(grid={"seed": list(range(100))}), **LIMITS)
    finally:
        event.remove(engine, "before_cursor_execute", before)
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


def test_a_trial_deleted_since_it_was_listed_is_skipped(
    sessions: sessionmaker[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``DELETE /jobs/{trial}`` that commits between the sweep's listing of its trials and
    the lock of that trial leaves nothing to delete there (it answered 404 naming the trial,
    on PostgreSQL, for a sweep that was still there)."""
    with sessions() as session:
        made = sweeps.create(session, spec(grid={"seed": [1, 2]}), **LIMITS)
        sweeps.cancel(session, made.id)
    listed = sweep_repo.trial_ids

    def listed_then_one_gone(session: Session, sweep_id: str) -> list[str]:
        return [*listed(session, sweep_id), "0" * 32]  # a trial that is no more

    monkeypatch.setattr(sweep_repo, "trial_ids", listed_then_one_gone)
    with sessions() as session:
        deleted = sweeps.delete(session, tmp_path, made.id)
    assert sorted(d.job_id for d in deleted) == sorted(t.job_id for t in made.trials)
    assert trial_rows(sessions, made.id) == []
