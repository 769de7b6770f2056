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


FIRST = """
import sys, threading
from workers.signals import on_signals
stop = threading.Event()
on_signals(lambda signum: (print(signum, flush=True), stop.set()), lambda signum: None)
print("ready", flush=True)
stop.wait()
"""


def test_a_hangup_stops_the_loop_unless_the_process_was_started_to_ignore_it() -> None:
    """Unhandled, a hangup ended the process at once (``run``'s children lived on); under
    ``nohup`` (SIGHUP ignored) it must still pass unnoticed, as it did before."""
    for nohup, first in ((False, signal.SIGHUP), (True, signal.SIGTERM)):
        proc = subprocess.Popen(
            [sys.executable, "-c", FIRST],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=(lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)) if nohup else None,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGHUP)
        if nohup:  # discarded as it is sent: this one stops the loop instead
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert proc.stdout.read() == f"{int(first)}\n", nohup  # the signal that stopped it
