"""Which process a worker is, and whether a process of its pid space still runs: what lets a
restarted worker recover the jobs of the dead ones beside it; and what on its host would make
it hand back every job it claims (its health check's concern)."""

from __future__ import annotations

import os
import secrets
import socket
import tempfile
from pathlib import Path

from service.settings import Settings

BOOT_ID = "/proc/sys/kernel/random/boot_id"  # new at every boot of the kernel
PID_NAMESPACE = "/proc/self/ns/pid"  # the namespace's inode: one per PID namespace
MNIST_FILES = (  # what torchvision reads from <MNIST_DATA_DIR>/MNIST/raw
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def new_worker_id() -> str:
    """host:pid:random, unique per worker process."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def pid_space() -> str:
    """Where a pid names one process: this boot of this kernel and this PID namespace, on
    Linux; elsewhere (no namespaces) the hostname. Workers that share a hostname need not
    share it: containers on the host's network each have a PID namespace of their own."""
    try:
        boot = Path(BOOT_ID).read_text().strip().replace("-", "")
        namespace = os.readlink(PID_NAMESPACE)  # "pid:[4026531836]"
    except OSError:
        return socket.gethostname()[:64]
    return f"{boot}:{namespace.removeprefix('pid:[').removesuffix(']')}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def host_problems(settings: Settings) -> list[str]:
    """What on this host would make its workers hand back every job they claim: checkpoints
    that cannot be written (``MNIST_ARTIFACTS=folder``), MNIST missing with downloads off.
    The worker's heartbeat said healthy while every job failed or went back for them."""
    problems = []
    if settings.artifacts == "folder":
        folder = settings.checkpoint_dir
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as exc:
            problems.append(f"checkpoints cannot be written to {folder}: {exc.strerror or exc}")
    raw = settings.data_dir / "MNIST" / "raw"
    missing = [name for name in MNIST_FILES if not (raw / name).is_file()]
    legacy = settings.data_dir / "MNIST" / "processed"  # torchvision reads these first
    if all((legacy / name).is_file() for name in ("training.pt", "test.pt")):
        missing = []
    if missing and not settings.download:
        problems.append(f"MNIST is not under {raw} ({', '.join(missing)}), downloads off")
    return problems
