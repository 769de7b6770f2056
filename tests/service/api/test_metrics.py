"""The folder several server processes share their Prometheus counts through."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.api.metrics import MULTIPROCESS_DIR_ENV, shared_counts


@pytest.fixture(autouse=True)
def no_folder_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MULTIPROCESS_DIR_ENV, raising=False)


def test_several_processes_get_a_fresh_folder_removed_at_exit() -> None:
    with shared_counts(2):
        folder = Path(os.environ[MULTIPROCESS_DIR_ENV])
        assert folder.is_dir() and not any(folder.iterdir())
        (folder / "counter_1.db").write_bytes(b"x")
    assert MULTIPROCESS_DIR_ENV not in os.environ
    assert not folder.exists()
    with shared_counts(2):
        assert Path(os.environ[MULTIPROCESS_DIR_ENV]) != folder  # one per server start


def test_one_process_keeps_its_counts_in_memory() -> None:
    with shared_counts(1):
        assert MULTIPROCESS_DIR_ENV not in os.environ


def test_the_operators_folder_is_used_and_its_old_counts_wiped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "prometheus"
    monkeypatch.setenv(MULTIPROCESS_DIR_ENV, str(folder))
    with shared_counts(2):
        assert os.environ[MULTIPROCESS_DIR_ENV] == str(folder)
        assert folder.is_dir()
        (folder / "counter_7.db").write_bytes(b"a previous run's counts")
        (folder / "notes.txt").write_text("the operator's")
    with shared_counts(1):  # the next start, with one process too
        assert not (folder / "counter_7.db").exists()
    assert (folder / "notes.txt").exists() and folder.is_dir()  # only our files go
