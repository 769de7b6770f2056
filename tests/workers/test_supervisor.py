"""The supervisor restarts what dies and stops only on its own signal: real processes.

The rule's tests supervise tiny ``python -c`` children (each records its pid in a file) with a
fast :class:`Backoff`; the service's test runs ``mnist-service run`` and kills its children.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import httpx
import pytest
from sqlalchemy.orm import Session, sessionmaker

from service.status import JobStatus
from service.store import metric_repo
from tests.jobs import queue_job, read_job
from tests.support import (
    REPO_ROOT,
    children_of,
    free_port,
    local_env,
    process,
    service_env,
    wait_for,
    wakes_over,
)
from workers.supervisor import Backoff, describe, stop_all

# Children that record their pid, then behave as their run's number says.
STEADY = "import os,sys,time; open(sys.argv[1],'a').write(f'{os.getpid()}\\n'); time.sleep(120)"
BY_RUN = """
import os, signal, sys, time
with open(sys.argv[1], "a") as f:
    f.write(f"{os.getpid()}\\n")
run = len(open(sys.argv[1]).read().split())
action = sys.argv[1 + run] if 1 + run < len(sys.argv) else "sleep"
if action == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
if action.startswith("up"):  # up<seconds>: stay up that long, then fail
    time.sleep(float(action[2:]))
    sys.exit(1)
if action != "sleep":
    sys.exit(int(action))
time.sleep(120)
"""
DEAF = (  # ignores SIGTERM: only a kill stops it
    "import os,signal,sys,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "open(sys.argv[1],'a').write(f'{os.getpid()}\\n'); time.sleep(120)"
)
PARENT = (  # starts a grandchild in its process group, as uvicorn starts its workers
    "import os,subprocess,sys,time; "
    "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
    "open(sys.argv[1],'a').write(f'{os.getpid()} {g.pid}\\n'); time.sleep(120)"
)
SUPERVISOR = """
import json, logging, sys
from workers.supervisor import Backoff, supervise
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
sys.exit(supervise(json.loads(sys.argv[1]), backoff=Backoff(**json.loads(sys.argv[2])),
                   refused=(2,), grace_s=0.0))
"""
FAST = {"first_s": 0.1, "max_s": 0.3, "stable_s": 5.0, "give_up_after": 4}
WINDOW_S = 3.0  # an idle supervisor is watched this long


def alive(pid: int) -> bool:
    """Running (a zombie, waiting for its parent to reap it, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def pids(path: Path) -> list[int]:
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def stop_for_good(proc: subprocess.Popen[bytes]) -> None:
    """After a failed test: freeze the supervisor (no more restarts), kill its children's
    process groups, then the supervisor."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGSTOP)
    for pid in children_of(proc.pid):
        with suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    proc.kill()
    proc.wait()


class Supervised:
    """``supervise()`` in a process of its own (it takes the signals), over tiny children."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.log = folder / "supervisor.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(
        self, children: dict[str, list[str]], python: str = sys.executable, **backoff: float
    ) -> subprocess.Popen[bytes]:
        """Supervise ``python -c code <pid file> args…`` for each ``name: [code, *args]``
        (``python``: the supervisor's interpreter, and so its children's)."""
        commands = {
            name: ["-c", code, str(self.folder / f"{name}.pids"), *args]
            for name, (code, *args) in children.items()
        }
        rule = json.dumps({**FAST, **backoff})
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [python, "-c", SUPERVISOR, json.dumps(commands), rule],
                cwd=REPO_ROOT,
                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return self.proc

    def pids(self, name: str) -> list[int]:
        return pids(self.folder / f"{name}.pids")

    def wait_started(self, name: str, times: int) -> int:
        """The pid of ``name``'s ``times``-th run, once it runs."""

        def started() -> int | None:
            found = self.pids(name)
            return found[times - 1] if len(found) >= times and alive(found[times - 1]) else None

        return wait_for(started, timeout_s=20, what=f"{name} to start {times} times")

    def text(self) -> str:
        return self.log.read_text()


@pytest.fixture
def supervised(tmp_path: Path) -> Iterator[Supervised]:
    s = Supervised(tmp_path)
    yield s
    if s.proc is not None:
        stop_for_good(s.proc)


def test_backoff_doubles_from_first_up_to_max() -> None:
    backoff = Backoff(first_s=0.5, max_s=30.0)
    assert [backoff.delay(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]


def test_an_exit_is_described_by_its_status_or_signal() -> None:
    assert describe(3) == "exited with status 3"
    assert describe(-signal.SIGKILL) == "was killed by SIGKILL"
    assert describe(-40) == "was killed by signal 40"


def test_a_child_that_exits_is_restarted_and_the_others_never_notice(
    supervised: Supervised,
) -> None:
    proc = supervised.start({"steady": [STEADY], "flaky": [BY_RUN, "0", "kill", "3"]})
    steady = supervised.wait_started("steady", 1)
    last = supervised.wait_started("flaky", 4)
    assert supervised.pids("steady") == [steady] and alive(steady)
    text = supervised.text()
    first, second, third, _ = supervised.pids("flaky")
    # A clean exit of a child nobody asked to stop is an exit too; the wait doubles, capped.
    assert f"flaky (pid {first}) exited with status 0 after" in text
    assert f"flaky (pid {second}) was killed by SIGKILL after" in text
    assert f"flaky (pid {third}) exited with status 3 after" in text
    for n, delay in ((1, 0.1), (2, 0.2), (3, 0.3)):
        assert f"; restart {n} in {delay} s" in text
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert not alive(steady) and not alive(last)


def test_an_idle_supervisor_sleeps_until_a_child_exits(supervised: Supervised) -> None:
    """No look every 0.2 s: a thread per child waits for its exit and wakes the supervisor."""
    proc = supervised.start({"steady": [STEADY], "flaky": [BY_RUN, "sleep"]})
    supervised.wait_started("steady", 1)
    first = supervised.wait_started("flaky", 1)
    assert wakes_over([proc.pid], WINDOW_S)[proc.pid] <= 2  # looking every 0.2 s: 15
    os.kill(first, signal.SIGKILL)
    assert supervised.wait_started("flaky", 2) != first  # the exit woke it
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0


def test_a_child_that_refuses_its_configuration_stops_everything(
    supervised: Supervised,
) -> None:
    proc = supervised.start({"steady": [STEADY], "refuser": [BY_RUN, "2"]})
    assert proc.wait(timeout=20) == 2
    [refuser] = supervised.pids("refuser")
    assert f"refuser (pid {refuser}) exited with status 2" in supervised.text()
    assert "refused its configuration" in supervised.text()
    assert not any(alive(p) for p in supervised.pids("steady"))


def test_a_child_that_cannot_start_stops_everything_after_a_few_tries(
    supervised: Supervised,
) -> None:
    proc = supervised.start({"steady": [STEADY], "broken": [BY_RUN, "1", "1", "1", "1", "1"]})
    assert proc.wait(timeout=20) == 1
    assert len(supervised.pids("broken")) == FAST["give_up_after"]
    assert "4 times in a row without staying up 5 s: it cannot start" in supervised.text()
    assert not any(alive(p) for p in supervised.pids("steady"))


def test_a_child_that_cannot_be_started_again_stops_everything(
    supervised: Supervised, tmp_path: Path
) -> None:
    """Its interpreter gone (a venv replaced under a running service): the restart's spawn
    failed, the supervisor died with a traceback and left the others running, the API holding
    its port. Now one line, everything stopped."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text(Path(sys.prefix, "pyvenv.cfg").read_text())
    (venv / "lib").symlink_to(Path(sys.prefix, "lib"))
    python = venv / "bin" / "python"
    python.symlink_to(Path(sys.executable).resolve())
    proc = supervised.start({"steady": [STEADY], "killed": [STEADY]}, python=str(python))
    steady, killed = supervised.wait_started("steady", 1), supervised.wait_started("killed", 1)
    python.unlink()
    os.kill(killed, signal.SIGKILL)
    assert proc.wait(timeout=20) == 1
    assert "a process could not be started" in supervised.text()
    assert "Traceback" not in supervised.text()
    assert not alive(steady)


def test_a_child_that_once_stayed_up_is_restarted_however_often_it_fails(
    supervised: Supervised,
) -> None:
    # Up long enough once, then failing at start: an outage, not a configuration; the wait
    # starts again from first_s after the run that stayed up.
    runs = [BY_RUN, "up1.2", "1", "1", "1", "up1.2", "1"]
    proc = supervised.start({"outage": runs}, stable_s=1.0, give_up_after=2)
    supervised.wait_started("outage", 7)
    delays = [line.rsplit(" in ", 1)[1] for line in supervised.text().splitlines() if "; r" in line]
    assert delays == ["0.1 s", "0.2 s", "0.3 s", "0.3 s", "0.1 s", "0.2 s"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0


def test_a_second_signal_kills_a_child_that_does_not_stop(supervised: Supervised) -> None:
    proc = supervised.start({"deaf": [DEAF]})
    deaf = supervised.wait_started("deaf", 1)
    proc.send_signal(signal.SIGTERM)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=1)
    assert alive(deaf)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 1  # not a clean stop: it had to be killed
    assert not alive(deaf)


def test_what_a_dead_child_started_dies_with_it(supervised: Supervised) -> None:
    supervised.start({"parent": [PARENT]})
    path = supervised.folder / "parent.pids"
    wait_for(lambda: path.exists() and path.read_text().endswith("\n"), timeout_s=20, what="run")
    parent, grandchild = (int(p) for p in path.read_text().split())
    os.kill(parent, signal.SIGKILL)
    wait_for(lambda: not alive(grandchild), timeout_s=10, what="the grandchild to be killed")
    wait_for(lambda: len(path.read_text().split()) == 4, timeout_s=20, what="a new parent")


# --- mnist-service run ----------------------------------------------------------------------

LEASE_S = 120.0  # a killed worker's job comes back by Worker.register, not by its lease
STEPS_PER_EPOCH = 2000  # 4,000 images, batch 2


def job_now(sessions: sessionmaker[Session], job_id: str) -> tuple[str, int, int]:
    job = read_job(sessions, job_id)
    return job.status, job.attempt, job.step


def role(cmdline: list[str]) -> str | None:
    """Which child of `run` this is (None for a process caught between fork and exec)."""
    module = cmdline[cmdline.index("-m") + 1] if "-m" in cmdline[:-1] else None
    return {"service": "api", "workers": "worker"}.get(module or "")


def test_run_restarts_a_killed_child_and_the_others_never_stop(
    db_url: str, sessions: sessionmaker[Session], medium_mnist: Path, tmp_path: Path
) -> None:
    port = free_port()
    env = local_env(
        db_url,
        medium_mnist,
        tmp_path,
        host="127.0.0.1",
        port=str(port),
        lease_s=str(LEASE_S),
        poll_interval_s="0.05",
        flush_interval_s="0.1",
        torch_threads="1",
    )
    body = {"epochs": 2, "batch_size": 2, "trainset_size": 4000, "testset_size": 200, "seed": 3}
    job_id = queue_job(sessions, body)
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        sup = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "run", "--workers", "1"],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5)
    try:

        def roles() -> dict[str, int]:
            found = {role(cmd): pid for pid, cmd in children_of(sup.pid).items()}
            assert sup.poll() is None, log.read_text()
            return {name: pid for name, pid in found.items() if name is not None}

        def serving() -> bool:
            try:
                return client.get("/healthz").status_code == 200
            except httpx.TransportError:
                return False

        def live_worker_pids() -> set[int]:
            return {w["pid"] for w in client.get("/workers").json()["workers"]}

        def training(attempt: int, past_step: int) -> bool:
            status, at, step = job_now(sessions, job_id)
            return status == JobStatus.RUNNING and at == attempt and step > past_step

        wait_for(lambda: training(1, STEPS_PER_EPOCH + 50), timeout_s=120, what="epoch 2")
        worker = roles()["worker"]
        # kill -9 of the worker mid-job: a new one starts, recovers the job as it registers (the
        # lease has two minutes to run) and resumes it after epoch 1.
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: training(2, STEPS_PER_EPOCH), timeout_s=60, what="attempt 2")
        new_worker, api = roles()["worker"], roles()["api"]
        assert new_worker != worker
        wait_for(serving, timeout_s=60, what="the API")
        assert live_worker_pids() == {new_worker}
        # kill -9 of the API: it is back within seconds; the worker goes on with the job.
        os.kill(api, signal.SIGKILL)
        wait_for(lambda: roles().get("api", api) != api, timeout_s=10, what="a new API")
        # (the restart comes 0.5 s after the kill; the rest is the API's own start, slow on a
        # busy machine)
        wait_for(serving, timeout_s=60, what="the new API to serve /healthz")
        assert roles()["worker"] == new_worker
        wait_for(
            lambda: job_now(sessions, job_id)[0] != JobStatus.RUNNING, timeout_s=120, what="end"
        )
        assert job_now(sessions, job_id)[:2] == (JobStatus.SUCCEEDED, 2)
        with sessions() as session:
            steps = metric_repo.read_steps(session, job_id, after_step=0, limit=100_000)
        assert [s["step"] for s in steps] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(timeout=60) == 0
        assert not alive(api) and not alive(new_worker)
    finally:
        client.close()
        stop_for_good(sup)
    text = log.read_text()
    assert f"worker-1 (pid {worker}) was killed by SIGKILL" in text
    assert f"api (pid {api}) was killed by SIGKILL" in text
    assert text.count("; restart 1 in 0.5 s") == 2 and text.count("; restart ") == 2
    assert re.search(rf"worker \S+:{worker}:\S+ is gone; 1 of its jobs are claimable again", text)


def test_workers_concurrency_restarts_a_killed_worker(
    sqlite_url: str, small_mnist: Path, tmp_path: Path
) -> None:
    env = service_env(database_url=sqlite_url, data_dir=str(small_mnist), device="cpu")
    log = tmp_path / "workers.log"
    with log.open("wb") as out:
        sup = subprocess.Popen(
            [sys.executable, "-m", "workers", "--concurrency", "2"],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def workers() -> list[int] | None:
            assert sup.poll() is None, log.read_text()
            found = [p for p, cmd in children_of(sup.pid).items() if role(cmd) == "worker"]
            return sorted(found) if len(found) == 2 else None

        def ready(n: int) -> bool:
            return log.read_text().count(" ready on cpu") == n

        wait_for(lambda: ready(2), timeout_s=60, what="two workers ready")
        killed, kept = wait_for(workers, timeout_s=10, what="two workers")
        os.kill(killed, signal.SIGKILL)
        wait_for(lambda: killed not in (workers() or [killed]), timeout_s=30, what="a new one")
        wait_for(lambda: ready(3), timeout_s=60, what="the new worker ready")
        assert kept in (workers() or [])
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(timeout=60) == 0
    finally:
        stop_for_good(sup)
    assert f"(pid {killed}) was killed by SIGKILL" in log.read_text()


def test_a_stop_waits_as_long_as_it_is_given_and_says_whom_it_kills(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A fixed 60 s wait cut short a worker given a longer grace for its epoch (its job left
    running under a lease), and the kill said nothing."""
    slow = "lambda *_: (time.sleep(1), sys.exit(0))"  # stops a second after the signal
    stubborn = "signal.SIG_IGN"
    code = (
        "import signal,sys,time; signal.signal(signal.SIGTERM, {}); "
        "print('ready', flush=True); time.sleep(60)"
    )
    procs = {
        name: subprocess.Popen([sys.executable, "-c", code.format(handler)], stdout=subprocess.PIPE)
        for name, handler in (("slow", slow), ("stubborn", stubborn))
    }
    for proc in procs.values():  # their handlers are set
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    with caplog.at_level("WARNING", logger="workers.supervisor"):
        clean = stop_all(procs, signal.SIGTERM, threading.Event(), wait_s=3.0)
    assert not clean and procs["slow"].returncode == 0  # it had the second it asked for
    assert procs["stubborn"].returncode == -signal.SIGKILL
    assert caplog.messages == ["stubborn had not stopped after 3 s; killed"]


FOLLOWING = "from workers.supervisor import follow_supervisor; follow_supervisor()\n" + STEADY


def test_the_children_stop_when_the_supervisor_is_killed(supervised: Supervised) -> None:
    """SIGKILL (or the OOM killer) of `run`: its children, in process groups of their own,
    lived on without it, the API holding its port."""
    proc = supervised.start({"following": [FOLLOWING]})
    following = supervised.wait_started("following", 1)
    proc.kill()
    proc.wait(timeout=10)
    wait_for(lambda: not alive(following), timeout_s=10, what="the orphaned child to stop")


def test_run_s_api_and_worker_stop_when_run_is_killed(
    sqlite_url: str, small_mnist: Path, tmp_path: Path
) -> None:
    """The real children, which ask the kernel for the signal as they start."""
    env = local_env(sqlite_url, small_mnist, tmp_path, port=str(free_port()))
    with process(["-m", "service.cli", "run", "--workers", "1"], env, tmp_path / "run.log") as sup:

        def both() -> dict[str, int] | None:
            assert sup.poll() is None, (tmp_path / "run.log").read_text()
            found = {role(cmd): pid for pid, cmd in children_of(sup.pid).items()}
            named = {name: pid for name, pid in found.items() if name is not None}
            return named if {"api", "worker"} <= named.keys() else None

        pids = wait_for(both, timeout_s=60, what="the API and a worker")
        sup.kill()
        sup.wait(timeout=10)
        orphans = set(pids.values())
        wait_for(lambda: not any(alive(p) for p in orphans), timeout_s=40, what="orphans to stop")


def test_a_hangup_stops_the_supervisor_and_its_children_cleanly(supervised: Supervised) -> None:
    """A closed terminal or ssh session (SIGHUP) ended the supervisor alone."""
    proc = supervised.start({"steady": [STEADY]})
    steady = supervised.wait_started("steady", 1)
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(timeout=20) == 0
    assert not alive(steady)
