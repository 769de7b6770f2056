"""The sweeps benchmark, end to end on small trials: real service processes with packing on and
off, every figure filled in and the goal written."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.report import Report
from benchmarks.sweeps import PACK_MAX_DEFAULT, grid_trials, run_sweeps, sweep_grid
from tests.support import SMALL_TEST, SMALL_TRAIN

SMALL_JOB = {"trainset_size": SMALL_TRAIN, "testset_size": SMALL_TEST, "epochs": 1}


def test_the_grid_has_exactly_the_asked_trials_each_once() -> None:
    grid = sweep_grid(8)
    trials = grid_trials(grid)
    assert len(trials) == 8
    assert len({(t["learning_rate"], t["seed"]) for t in trials}) == 8
    with pytest.raises(ValueError, match="multiple"):
        sweep_grid(6)


def test_the_section_measures_a_sweep_and_the_same_jobs_one_by_one(
    small_mnist: Path, tmp_path: Path
) -> None:
    report = Report("Benchmarks")
    section = report.section("Sweeps")
    measured = run_sweeps(
        section,
        tmp_path,
        rounds=1,
        trials=4,
        params=SMALL_JOB,
        data_root=small_mnist,
        pack_sizes=(1, 2),
    )

    assert [m.pack_max for m in measured] == sorted({PACK_MAX_DEFAULT, 1}, reverse=True)
    for m in measured:
        assert len(m.sweep.values) == len(m.one_by_one.values) == 1
        assert m.sweep.median > 0 and m.one_by_one.median > 0 and m.first > 0
    text = report.render()
    assert "a sweep of 4 trials ≥ 2× faster than one at a time (CPU)" in text
    assert "| K | packed s |" in text and "\n| 2 | " in text
