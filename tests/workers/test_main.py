"""``python -m workers --check``: the containers' health check, run as a real process."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
import torch
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from service.clock import utcnow
from service.store import worker_repo
from service.store.tables import WorkerRow
from service.store.upkeep.db_clock import database_time
from tests.support import run_python, service_env
from workers.host import pid_space

LEASE_S = 30.0


def check(database_url: str, **settings: str) -> subprocess.CompletedProcess[str]:
    env = service_env(database_url=database_url, lease_s=str(LEASE_S), heartbeat_s="5", **settings)
    return run_python(["-m", "workers", "--check"], env)


def register(
    sessions: sessionmaker[Session], worker_id: str, host: str, age_s: float, space: str
) -> None:
    with sessions.begin() as session:
        worker_repo.register_worker(
            session,
            worker_id=worker_id,
            host=host,
            pid=1,
            device="cpu",
            now=utcnow(),
            pid_space=space,
        )
        heard = database_time(-age_s)  # its last heartbeat, on the clock liveness is judged by
        session.execute(
            update(WorkerRow).where(WorkerRow.id == worker_id).values(heartbeat_at=heard)
        )


def test_check_is_healthy_only_with_a_fresh_heartbeat_on_this_host(
    db_url: str, sessions: sessionmaker[Session], small_mnist: Path, tmp_path: Path
) -> None:
    host, here = socket.gethostname(), pid_space()
    serving = {"data_dir": str(small_mnist), "checkpoint_dir": str(tmp_path / "models")}
    register(sessions, "elsewhere:1:a", "elsewhere", age_s=0, space="other")  # another machine
    # A container of this hostname with a PID namespace of its own (the host's network).
    register(sessions, f"{host}:1:box", host, age_s=0, space=f"{here}0")
    register(sessions, f"{host}:1:old", host, age_s=LEASE_S + 5, space=here)  # silent too long
    result = check(db_url, **serving)
    assert result.returncode == 1
    assert f"no worker on {host} was heard from in 30 s" in result.stdout
    register(sessions, f"{host}:1:new", host, age_s=1, space=here)
    result = check(db_url, **serving)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"healthy: {host}:1:new"
    with sessions.begin() as session:
        worker_repo.worker_stopped(session, worker_id=f"{host}:1:new", now=utcnow())
    assert check(db_url, **serving).returncode == 1


def test_check_is_unhealthy_when_its_host_cannot_serve_a_job(
    db_url: str, sessions: sessionmaker[Session], small_mnist: Path, tmp_path: Path
) -> None:
    """Every job was handed back (or failed) for a checkpoint folder it could not write or a
    data set it could not read, while the heartbeat said healthy (a review)."""
    register(sessions, f"{socket.gethostname()}:1:w", "h", age_s=0, space=pid_space())
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = check(
        db_url,
        artifacts="folder",
        checkpoint_dir=str(blocker / "models"),
        data_dir=str(tmp_path / "nowhere"),
    )
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"unhealthy: checkpoints cannot be written to {blocker}/models")
    assert lines[1].startswith(f"unhealthy: MNIST is not under {tmp_path}/nowhere/MNIST/raw")
    healthy = check(db_url, data_dir=str(small_mnist), checkpoint_dir=str(tmp_path / "m"))
    assert healthy.returncode == 0, healthy.stdout


def test_check_is_unhealthy_when_the_database_is_unreachable(tmp_path: Path) -> None:
    result = check(f"sqlite:///{tmp_path}/missing/folder/mnist.db")
    assert result.returncode == 1
    assert "unhealthy: the database is unreachable: OperationalError" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has the device asked for")
def test_a_worker_asked_for_a_device_this_machine_lacks_refuses_in_one_line(
    sqlite_url: str,
) -> None:
    """A traceback and exit 1, which ``run`` and systemd restarted again and again."""
    env = service_env(database_url=sqlite_url, device="cuda")
    result = run_python(["-m", "workers"], env, timeout_s=120)
    assert result.returncode == 2, result.stderr
    assert "MNIST_DEVICE=cuda but no CUDA device is available" in result.stderr
    assert "Traceback" not in result.stderr
