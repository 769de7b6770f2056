"""A deadline for a whole call of the CLI: httpx's timeouts bound each read, not an answer."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class DeadlinePassed(Exception):
    """A call ran past its deadline."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise :class:`DeadlinePassed` into the block once it has run ``seconds``.

    A timer signal, which interrupts the blocked read (httpx has no overall timeout); only the
    main thread receives one, so elsewhere (the client as a library) there is none."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def passed(signum: int, frame: object) -> None:
        raise DeadlinePassed

    previous = signal.signal(signal.SIGALRM, passed)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
