"""Which process a worker is, and whether a process of this machine still runs: what lets a
restarted worker recover the jobs of the dead ones on its host."""

from __future__ import annotations

import os
import secrets
import socket


def new_worker_id() -> str:
    """host:pid:random, unique per worker process."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
