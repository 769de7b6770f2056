"""Helpers the tests share: synthetic MNIST files, waiting on conditions, running processes."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import anyio
import httpx
import numpy as np
import pytest
import torch
from sqlalchemy import text, update
from sqlalchemy.orm import Session, sessionmaker

from service.settings import Settings
from service.store.artifacts.backends import DATABASE_PREFIX, ArtifactSource, in_database
from service.store.engines import make_engine
from service.store.tables import Artifact

REPO_ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")

# Tests that need a card: skipped here, run on the lent GPU machine (benchmarks/gpu_device.sh).
NEEDS_CUDA = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (the lent GPU machine runs it)"
)

SMALL_TRAIN = 640
SMALL_TEST = 200


def synthetic_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` learnable 28×28 uint8 images in MNIST's layout, on black like MNIST's.

    Digit d is a 20×20 frame's two side strokes and two bars, 2d rows in from its top and
    bottom edges: the bars' gap tells the digits apart, while the ink's box (20 px) and centre of
    mass (13.5, 13.5) stay where MNIST puts them, so predict reads a 28×28 image of one as it
    is, as it reads an MNIST digit (a digit told by where it sits would be moved by the layout).
    Ink levels vary from pixel to pixel, up to 255.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    for i, d in enumerate(labels):
        for left in (4, 22):  # the side strokes, rows 4–23
            images[i, 4:24, left : left + 2] = rng.integers(150, 256, size=(20, 2), dtype=np.uint8)
        for top in (4 + int(d), 22 - int(d)):  # two bars, symmetric about row 13.5
            images[i, top : top + 2, 4:24] = rng.integers(200, 256, size=(2, 20), dtype=np.uint8)
        images[i, 4, 4] = 255  # the strongest ink at full level, as MNIST's is (254 or 255)
    return images, labels


def write_idx_images(path: Path, images: np.ndarray) -> None:
    """MNIST's IDX3 format: magic 2051, count, rows, cols, then the bytes."""
    n, rows, cols = images.shape
    path.write_bytes(struct.pack(">IIII", 2051, n, rows, cols) + images.tobytes())


def write_idx_labels(path: Path, labels: np.ndarray) -> None:
    """MNIST's IDX1 format: magic 2049, count, then the bytes."""
    path.write_bytes(struct.pack(">II", 2049, len(labels)) + labels.tobytes())


def make_small_mnist(root: Path, train: int = SMALL_TRAIN, test: int = SMALL_TEST) -> Path:
    """A small MNIST in torchvision's layout (root/MNIST/raw), readable with download=False."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", train, 1), ("t10k", test, 2)):
        images, labels = synthetic_digits(n, seed)
        write_idx_images(raw / f"{split}-images-idx3-ubyte", images)
        write_idx_labels(raw / f"{split}-labels-idx1-ubyte", labels)
    return root


# Runs a test under each MNIST_ARTIFACTS (through the ``artifacts`` fixture of tests/conftest.py).
BOTH_STORES = pytest.mark.parametrize(
    "artifacts", ["database", "folder"], ids=["in-db", "in-folder"], indirect=True
)


def stored(settings: Settings, sessions: sessionmaker[Session], ref: str | None) -> bool:
    """Whether the artifact a job's row names (``ref``) is there to read, wherever it is."""
    return (
        ref is not None and ArtifactSource(settings.checkpoint_dir, sessions).open(ref) is not None
    )


def overwrite_artifact(
    settings: Settings, sessions: sessionmaker[Session], ref: str, data: bytes
) -> None:
    """Replace the bytes of the artifact a job's row names (``ref``), wherever it is: damage
    done to a file on disk, or to a row."""
    if in_database(ref):
        name = ref.removeprefix(DATABASE_PREFIX)
        with sessions.begin() as session:
            session.execute(update(Artifact).where(Artifact.name == name).values(data=data))
    else:
        (settings.checkpoint_dir / Path(ref).name).write_bytes(data)


def files_only(folder: Path) -> ArtifactSource:
    """A source for models whose rows name files in ``folder`` (its sessions are never used)."""
    return ArtifactSource(folder, sessionmaker())


def app_settings(database_url: str, tmp_path: Path, **overrides: Any) -> Settings:
    """Settings for an app under test: this database, checkpoints in ``tmp_path``, CPU, fast
    polling, never downloading, and no API keys unless given (whatever the environment says)."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "data_dir": tmp_path / "data",
        "download": False,
        "checkpoint_dir": tmp_path / "models",
        "device": "cpu",
        "poll_interval_s": 0.05,
        "flush_interval_s": 0.05,
        "api_key": None,
        "readonly_api_key": None,
        "allow_no_auth": False,
    }
    return Settings(**{**values, **overrides})


def wait_for(
    probe: Callable[[], T | None], *, timeout_s: float, what: str, every_s: float = 0.05
) -> T:
    """Poll ``probe`` until it returns something other than None/False, or fail after a deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(every_s)


async def wait_until(
    probe: Callable[[], bool], *, timeout_s: float, what: str, every_s: float = 0.01
) -> None:
    """:func:`wait_for` inside an event loop: polls without blocking the loop it waits on."""
    deadline = time.monotonic() + timeout_s
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await anyio.sleep(every_s)


def together(calls: Sequence[Callable[[], T]]) -> list[T]:
    """Make the calls from threads of their own, all released at the same moment."""
    start = threading.Barrier(len(calls))
    answers: dict[int, T] = {}

    def call(i: int) -> None:
        start.wait()
        answers[i] = calls[i]()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(answers) == list(range(len(calls)))
    return [answers[i] for i in range(len(calls))]


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


needs_wrk = pytest.mark.skipif(
    shutil.which("wrk") is None, reason="needs wrk (apt-get install wrk; CI installs it)"
)


def service_env(**settings: str) -> dict[str, str]:
    """The environment for a service process: MNIST_* settings, never downloading."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNIST_")}
    env.update({"MNIST_DOWNLOAD": "false", "PYTHONUNBUFFERED": "1"})
    env.update({f"MNIST_{k.upper()}": v for k, v in settings.items()})
    return env


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 15) -> None:
    """Terminate ``proc`` if it still runs; kill it if it has not exited after ``timeout_s``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def process_cmd(
    command: list[str], env: dict[str, str], log: Path, stop_timeout_s: float = 15
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``command`` with output to ``log``; :func:`stop` it on exit."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            yield proc
        finally:
            stop(proc, stop_timeout_s)


def children_of(parent: int) -> dict[int, list[str]]:
    """The live child processes of ``parent``: pid → command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with suppress(OSError):
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[1]) == parent and stat[0] not in ("Z", "X"):
                found[int(entry.name)] = (entry / "cmdline").read_text().split("\0")[:-1]
    return found


def _sleeps_begun(status: Path) -> int:
    """A thread's voluntary context switches so far (0 once it has ended): each is a sleep
    begun, so their growth over a window counts how often an idle thread woke."""
    try:
        text = status.read_text()
    except OSError:  # the thread has ended
        return 0
    for line in text.splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    raise AssertionError(f"no voluntary_ctxt_switches in {status}")


def _threads_sleeps(pid: int) -> dict[str, int]:
    """:func:`_sleeps_begun` of each thread of ``pid``, by thread id."""
    return {
        status.parent.name: _sleeps_begun(status)
        for status in Path(f"/proc/{pid}/task").glob("*/status")
    }


def wakes_over(pids: Sequence[int], window_s: float) -> dict[int, int]:
    """How often each process of ``pids`` woke over the next ``window_s`` (a window measured,
    not a wait for a condition), its threads' together: a thread begun within counts whole; one
    that ended within takes its wakes with it (they come out low, never high)."""
    before = {pid: _threads_sleeps(pid) for pid in pids}
    time.sleep(window_s)
    return {
        pid: sum(n - before[pid].get(tid, 0) for tid, n in _threads_sleeps(pid).items() if n)
        for pid in pids
    }


def thread_wakes_over(thread: threading.Thread, window_s: float) -> int:
    """How often ``thread``, of this process, woke over the next ``window_s``."""
    status = Path(f"/proc/self/task/{thread.native_id}/status")
    before = _sleeps_begun(status)
    time.sleep(window_s)
    return _sleeps_begun(status) - before


def local_env(database_url: str, data_dir: Path, tmp_path: Path, **settings: str) -> dict[str, str]:
    """:func:`service_env` for a service and its workers on this database and data set, training
    on the CPU, their checkpoints in ``tmp_path / "models"``."""
    return service_env(
        database_url=database_url,
        data_dir=str(data_dir),
        checkpoint_dir=str(tmp_path / "models"),
        device="cpu",
        **settings,
    )


def run_python(
    args: list[str], env: dict[str, str], *, timeout_s: float = 60, cwd: Path = REPO_ROOT
) -> subprocess.CompletedProcess[str]:
    """Run ``python <args>`` to its end (``timeout_s`` at most): its exit status and output."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


@contextmanager
def process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``python <args>`` with output to ``log``; terminate it (then kill) on exit."""
    with process_cmd([sys.executable, *args], env, log) as proc:
        yield proc


@contextmanager
def api_process(
    env: dict[str, str], log: Path, headers: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], httpx.Client]]:
    """A real uvicorn serving the app (``python -m service``): the process and a client for it."""
    port = free_port()
    env = {**env, "MNIST_PORT": str(port), "MNIST_HOST": "127.0.0.1"}
    with (
        process(["-m", "service"], env, log) as proc,
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30, headers=headers) as client,
    ):

        def healthy() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"API exited early:\n{log.read_text()}")
            try:
                return client.get("/healthz").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, timeout_s=60, what="the API to answer /healthz")
        yield proc, client


@contextmanager
def api_server(env: dict[str, str], log: Path) -> Iterator[httpx.Client]:
    """A real uvicorn serving the app (``python -m service``); yields a client for it."""
    with api_process(env, log) as (_proc, client):
        yield client


# promtool (Debian's ``prometheus`` package; .ci/run installs it) lints a scrape as Prometheus
# reads it: names, types, help, histogram buckets, duplicate series.
PROMTOOL = shutil.which("promtool")
NEEDS_PROMTOOL = pytest.mark.skipif(
    PROMTOOL is None, reason="needs promtool (apt-get install prometheus; CI installs it)"
)


def promtool_problems(scrape: str) -> str:
    """What ``promtool check metrics`` finds wrong in a scrape (empty when it passes)."""
    assert PROMTOOL is not None
    checked = subprocess.run(
        [PROMTOOL, "check", "metrics"],
        input=scrape,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return "" if checked.returncode == 0 else checked.stdout + checked.stderr or "failed"


def stamp_revision(url: str, revision: str) -> None:
    """Mark the database at ``url`` as at ``revision`` (one the scripts may not know: a newer
    code's), its schema untouched."""
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = :r"), {"r": revision})
    finally:
        engine.dispose()


class FakeClock:
    """A clock that moves only when the code under test sleeps (or a test sets ``now``): call
    it for the time; ``sleep`` records each pause asked for in ``pauses`` and moves on by it."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now
        self.pauses: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds
