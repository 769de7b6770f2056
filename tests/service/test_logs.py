"""Logs: one JSON object per line with the job's id and attempt, or text with them appended."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from service.logs import JsonFormatter, TextFormatter, configure_logging, log_context
from service.settings import Settings


@pytest.fixture
def restore_root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def capture(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    configure_logging(settings)
    return stream


@pytest.mark.usefixtures("restore_root_logging")
def test_json_lines_carry_the_context(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = capture(Settings(log_format="json", log_level="DEBUG"), monkeypatch)
    log = logging.getLogger("workers")
    log.debug("outside")
    with log_context(worker_id="w1"), log_context(job_id="abc", attempt=2):
        log.info("epoch %d done", 1, extra={"accuracy": 0.9})
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("failed")
    lines = stream.getvalue().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 3
    assert records[0]["message"] == "outside" and "job_id" not in records[0]
    first = records[1]
    assert first["message"] == "epoch 1 done" and first["level"] == "INFO"
    assert (first["job_id"], first["attempt"], first["worker_id"]) == ("abc", 2, "w1")
    assert first["accuracy"] == 0.9 and first["logger"] == "workers"
    assert first["ts"].endswith("+00:00")
    assert "RuntimeError: boom" in records[2]["exc"]


@pytest.mark.usefixtures("restore_root_logging")
def test_text_lines_append_the_context(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = capture(Settings(log_format="text"), monkeypatch)
    with log_context(job_id="abc", attempt=1):
        logging.getLogger("workers").info("training")
    logging.getLogger("workers").debug("hidden at INFO")
    [line] = stream.getvalue().splitlines()
    assert line.endswith("INFO workers: training [job_id=abc attempt=1]")


def test_formatters_keep_standard_fields_out_of_the_extras() -> None:
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "plain", None, None)
    assert set(json.loads(JsonFormatter().format(record))) == {"ts", "level", "logger", "message"}
    assert TextFormatter().format(record).endswith("WARNING x: plain")


def test_log_settings_are_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MNIST_LOG_LEVEL", "warning")
    assert Settings().log_level == "WARNING"
    with pytest.raises(ValueError, match="log_format"):
        Settings(log_format="xml")  # type: ignore[arg-type]
