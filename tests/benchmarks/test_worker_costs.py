"""Where the worker's time goes, end to end on a small job: the worker in this process on each
database, every part switched off in its own job, and a part that was not switched off refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from benchmarks.report import Report
from benchmarks.result_service import postgres_reachable
from benchmarks.worker_costs import (
    SHIPPED,
    Hits,
    Part,
    Replacement,
    parts,
    run_one_job,
    run_worker_costs,
    skip,
)
from service.schemas import JobCreate
from service.settings import Settings
from service.store import metric_repo, queue_repo
from service.store.tables import TrainStep
from tests.support import SMALL_TEST, SMALL_TRAIN

SMALL_JOB = {"trainset_size": SMALL_TRAIN, "testset_size": SMALL_TEST, "epochs": 3}


def test_the_section_times_each_part_switched_off_on_each_database(
    small_mnist: Path, tmp_path: Path
) -> None:
    report = Report("Benchmarks")
    section = report.section("Where the worker's time goes")
    results = run_worker_costs(section, tmp_path, rounds=2, params=SMALL_JOB, data_root=small_mnist)

    expected = ["sqlite"] + (["postgresql"] if postgres_reachable() is None else [])
    assert [c.name for c in results] == expected
    labels = [p.label for p in parts()]
    for costs in results:
        assert list(costs.jobs) == labels
        assert all(len(times) == 2 and min(times) > 0 for times in costs.jobs.values())
        assert costs.floor_s > 0
        assert len(costs.cost_ms("no training states")) == 2
    text = report.render()
    for label in labels[1:]:  # each part's row, with its cost, once per database
        assert text.count(f"| {label} |") == len(results)
    assert text.count(f"| {SHIPPED} |") == len(results)


def test_a_part_that_skipped_no_call_is_refused_and_put_back(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    # The worker never hands a job back on its own: a "part" that swaps that out switches
    # nothing off, and must not pass for a part that costs nothing.
    original = queue_repo.hand_back
    missed = Part("nothing really", "nothing", ((queue_repo, "hand_back", skip),))
    with pytest.raises(RuntimeError, match="0 calls skipped, fewer than 1"):
        run_one_job(missed, settings, sessions, JobCreate.model_validate(SMALL_JOB))
    assert queue_repo.hand_back is original


def test_a_part_whose_job_left_the_rows_it_keeps_out_is_refused(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    def counted_but_stored(original: Replacement, skipped: Hits, *args: Any) -> None:
        skipped.count += 1
        original(*args)  # says it skipped, stores all the same

    liar = Part(
        "steps said skipped",
        "nothing",
        ((metric_repo, "insert_steps", counted_but_stored),),
        none_of=TrainStep,
    )
    with pytest.raises(RuntimeError, match="has train_steps rows"):
        run_one_job(liar, settings, sessions, JobCreate.model_validate(SMALL_JOB))
