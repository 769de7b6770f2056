"""Which process a worker is, and whether a process of its pid space still runs: what lets a
restarted worker recover the jobs of the dead ones beside it."""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

BOOT_ID = "/proc/sys/kernel/random/boot_id"  # new at every boot of the kernel
PID_NAMESPACE = "/proc/self/ns/pid"  # the namespace's inode: one per PID namespace


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
