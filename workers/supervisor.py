"""Run several processes as one: signals go to all of them, and they stop together."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading

from workers.signals import on_signals

SHUTDOWN_WAIT_S = 60.0


def supervise(commands: list[list[str]]) -> int:
    """Start ``python <args>`` for each command and wait for them all.

    The first SIGINT/SIGTERM is passed on to every child (each stops gracefully); a second
    one kills them. When one child exits on its own, the others are asked to stop too.
    Returns 0 when every child exited cleanly or by our signal, else 1.
    """
    # Each child in a process group of its own: a terminal's Ctrl-C reaches this process alone,
    # which passes it on once (a second signal would make the children exit at once).
    procs = [subprocess.Popen([sys.executable, *args], process_group=0) for args in commands]
    signalled = threading.Event()

    def forward(signum: int) -> None:
        signalled.set()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    def kill(_signum: int) -> None:
        for p in procs:
            p.kill()

    on_signals(forward, kill)
    while not signalled.wait(0.2):
        if any(p.poll() is not None for p in procs):
            break
    for p in procs:
        if p.poll() is None and not signalled.is_set():
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=SHUTDOWN_WAIT_S)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    clean = (0, -signal.SIGINT, -signal.SIGTERM)
    return 0 if all(p.returncode in clean for p in procs) else 1
