"""Where the worker's time goes, end to end on a small job: the worker in this process on each
database, every part switched off in its own job, and a part that was not switched off refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from benchmarks.report import Report
from benchmarks.result_service import postgres_reachable
from benchmarks.worker_costs import SHIPPED, Part, parts, run_one_job, run_worker_costs, skip
from service.schemas import JobCreate
from service.settings import Settings
from service.store import queue_repo
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


def test_a_part_whose_replacement_is_never_called_is_refused(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    # The worker never hands a job back on its own: a "part" that swaps that out switches
    # nothing off, and must not pass for a part that costs nothing.
    missed = Part("nothing really", "nothing", ((queue_repo, "hand_back", skip),))
    with pytest.raises(RuntimeError, match="never called"):
        run_one_job(missed, settings, sessions, JobCreate.model_validate(SMALL_JOB))
