"""Signals are handled off the interrupted code: no deadlock, however busy the main thread is."""

from __future__ import annotations

import signal
import subprocess
import sys

from tests.support import REPO_ROOT

WAITER = """
import sys, threading
from workers.signals import on_signals
stop = threading.Event()
on_signals(lambda signum: stop.set(), lambda signum: sys.exit(3))
print("ready", flush=True)
while not stop.wait(0):  # most of the time inside Event.wait, holding its lock
    pass
print("stopped", flush=True)
"""


def test_a_signal_during_event_wait_stops_the_loop_every_time() -> None:
    for _ in range(8):  # the old way (Event.set in the handler) hung about half the time
        proc = subprocess.Popen(
            [sys.executable, "-c", WAITER], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0  # a handler calling Event.set() here could hang
        assert proc.stdout.read() == "stopped\n"
