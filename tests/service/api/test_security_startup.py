"""Starting the API where others can reach it, without a key, is refused with the way out."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from service.cli import commands as cli
from service.settings import get_settings
from tests.support import run_python, service_env

STARTUP_TIMEOUT_S = 60


def start_api(**settings: str) -> subprocess.CompletedProcess[str]:
    return run_python(["-m", "service"], service_env(**settings), timeout_s=STARTUP_TIMEOUT_S)


def test_python_m_service_refuses_a_public_address_without_a_key() -> None:
    result = start_api(host="0.0.0.0", port="1")  # port 1: it must not even try to bind
    assert result.returncode == 2, result.stderr
    for hint in ("refusing", "0.0.0.0", "MNIST_API_KEY", "MNIST_ALLOW_NO_AUTH=true"):
        assert hint in result.stderr
    assert "Uvicorn running" not in result.stderr


def test_mnist_service_run_refuses_before_starting_anything(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MNIST_HOST", "::")
    monkeypatch.delenv("MNIST_API_KEY", raising=False)
    monkeypatch.delenv("MNIST_ALLOW_NO_AUTH", raising=False)
    started: list[object] = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(a))
    get_settings.cache_clear()
    try:
        assert cli.main(["run"]) == 2
    finally:
        get_settings.cache_clear()
    assert started == []
    assert "MNIST_API_KEY" in capsys.readouterr().err


@pytest.mark.parametrize("program", [["-m", "service"], ["-m", "workers"]], ids=["api", "worker"])
def test_a_process_refuses_settings_it_cannot_use_with_exit_2_and_no_value(
    program: list[str],
) -> None:
    # A traceback that printed the key given, and exit 1, which systemd retries (exit 2 it
    # does not: RestartPreventExitStatus).
    env = service_env(api_key="my secret key with spaces 12345", lease_s="inf")
    result = run_python(program, env, timeout_s=STARTUP_TIMEOUT_S)
    assert result.returncode == 2, result.stderr
    assert "MNIST_API_KEY: Value error, API keys must be printable ASCII" in result.stderr
    assert "MNIST_LEASE_S: Input should be a finite number" in result.stderr
    assert "secret" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("program", [["-m", "service"], ["-m", "workers"]], ids=["api", "worker"])
def test_a_process_refuses_a_database_whose_schema_is_not_its_own(
    program: list[str], tmp_path: Path
) -> None:
    """The API served 500 on every route and a worker died at its first query with a traceback,
    restarted forever by its supervisor; neither said to migrate. Exit 2 (not retried by
    systemd), one line saying what to run; a database it cannot reach is no refusal (an
    outage is ridden out)."""
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    result = run_python(program, service_env(database_url=empty), timeout_s=STARTUP_TIMEOUT_S)
    assert result.returncode == 2, result.stderr
    assert "the database has no schema yet: run `mnist-service migrate`" in result.stderr
    assert "Traceback" not in result.stderr
