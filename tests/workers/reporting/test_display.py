"""What a person watching a worker sees (workers.reporting.display)."""

from __future__ import annotations

import logging

import pytest

from workers.reporting.display import ProgressDisplay


def test_json_logs_get_one_line_per_epoch(caplog: pytest.LogCaptureFixture) -> None:
    display = ProgressDisplay(job_id="abcdef0123", epochs=3, steps_per_epoch=10, show_bar=False)
    with caplog.at_level(logging.INFO, logger="workers"):
        for _ in range(10):
            display.step_taken(0)
        display.flushed(10, 0.25, None)
        display.epoch_done(1, 0.25, 0.875)
    lines = [r for r in caplog.records if "epoch" in r.getMessage()]
    assert [r.getMessage() for r in lines] == ["epoch 1/3: loss 0.2500, test accuracy 0.8750"]


def test_a_bar_per_epoch(capsys: pytest.CaptureFixture[str]) -> None:
    display = ProgressDisplay(job_id="abcdef0123", epochs=2, steps_per_epoch=4, show_bar=True)
    display.step_taken(0)
    display.flushed(4, 0.5, None)
    display.epoch_done(1, 0.5, 0.75)
    display.step_taken(1)
    display.close()
    err = capsys.readouterr().err
    assert "job abcdef01 epoch 1/2" in err and "4/4" in err
    assert "epoch 2/2" in err
