"""SIGINT, SIGTERM and SIGHUP handled on a thread of their own, never inside the interrupted
code. SIGHUP (the terminal or ssh session closed) stops as SIGTERM does: unhandled it ended the
process at once, and `mnist-service run`'s children (process groups of their own, which the
hangup does not reach) lived on, holding the port, with no parent. A process started with
SIGHUP ignored (``nohup``) keeps ignoring it."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def on_signals(first: Callable[[int], None], again: Callable[[int], None]) -> None:
    """Call ``first`` for the first of :data:`SIGNALS` and ``again`` for every later one.

    Python runs a signal handler in the main thread between two bytecodes, possibly while
    that thread holds a lock the handler would need: ``Event.set()`` from a handler that
    interrupted ``Event.wait()`` deadlocks. So the handler only writes the signal's number to
    a pipe, and a daemon thread reads it and makes the calls.
    """
    read_fd, write_fd = os.pipe()

    def handler(signum: int, _frame: FrameType | None) -> None:
        os.write(write_fd, bytes([signum]))

    def watch() -> None:
        callback = first
        while True:
            signum = os.read(read_fd, 1)[0]
            callback(signum)
            callback = again

    threading.Thread(target=watch, name="signals", daemon=True).start()
    for signum in SIGNALS:
        if signum == signal.SIGHUP and signal.getsignal(signum) is signal.SIG_IGN:
            continue  # started under nohup: a hangup is meant to pass unnoticed
        signal.signal(signum, handler)
