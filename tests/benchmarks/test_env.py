"""Where a benchmark's processes run: the service's on the CPU, its clients on the job's cores
or on cores of their own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.env import (
    CLIENT_CPUS_ENV,
    Workspace,
    client_command,
    client_cpus,
    clients_where,
)
from tests.support import REPO_ROOT

# A run confined to core 0 that starts a client with client_command and prints the cores the
# client's own process found itself on, and the report's lines.
PIN_SCRIPT = """
import os, subprocess, sys
os.sched_setaffinity(0, {0})
from benchmarks.env import client_command, machine_lines
child = [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"]
out = subprocess.run(client_command(child), capture_output=True, text=True, check=True).stdout
print(out.strip())
print(machine_lines()[-1])
"""


def test_without_the_setting_clients_share_the_jobs_cores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(CLIENT_CPUS_ENV, raising=False)
    assert client_cpus() is None
    assert client_command(["wrk", "-t1"]) == ["wrk", "-t1"]
    assert clients_where() == "on the job's cores"


@pytest.mark.parametrize(
    ("value", "says"),
    [("two,three", "give core numbers"), ("0", "outside this run's own"), ("9999", "outside")],
)
def test_client_cores_that_are_not_spare_cores_fail_fast(
    monkeypatch: pytest.MonkeyPatch, value: str, says: str
) -> None:
    monkeypatch.setenv(CLIENT_CPUS_ENV, value)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0})
    with pytest.raises(SystemExit, match=says):
        client_cpus()


def test_client_cores_without_taskset_fail_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CLIENT_CPUS_ENV, "1")
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0})
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    with pytest.raises(SystemExit, match="needs taskset"):
        client_command(["wrk"])


@pytest.mark.skipif(
    not {0, 1} <= os.sched_getaffinity(0), reason="needs cores 0 and 1: the run's and the client's"
)
def test_a_client_started_with_the_setting_runs_on_its_own_cores() -> None:
    env = {**os.environ, CLIENT_CPUS_ENV: "1", "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", PIN_SCRIPT],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.splitlines()
    assert out[0] == "[1]"
    assert out[1] == (
        f"- Cores: this run's processes on core 0; the clients that stand for users on core "
        f"1, apart from the job's ({CLIENT_CPUS_ENV})."
    )


def test_a_workspaces_service_processes_train_on_the_cpu_unless_told(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, small_mnist: Path
) -> None:
    # A worker left at "auto" trains on a card where there is one: the CPU sections measured
    # GPU jobs on a lent machine before this held.
    monkeypatch.setenv("MNIST_DATA_DIR", str(small_mnist))
    monkeypatch.setenv("MNIST_DEVICE", "cuda")  # the caller's own setting does not leak in
    ws = Workspace(tmp_path)
    assert ws.env()["MNIST_DEVICE"] == "cpu"
    assert ws.env(device="cuda")["MNIST_DEVICE"] == "cuda"
    assert ws.env(poll_interval_s="0.05")["MNIST_POLL_INTERVAL_S"] == "0.05"
