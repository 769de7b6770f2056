"""The cap on the event streams one API process serves at once."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from service.errors import AtCapacity

STREAMS_RETRY_AFTER_S = 5  # a stream refused at the cap may be asked for again this soon


class OpenStreams:
    """How many event streams this process has open: the one count the cap is checked against.

    Every open stream reads the database when its job's worker has written (or every
    ``events_poll_s``), on the event loop or in the thread pool; past some hundreds they slow
    every other request, so a stream beyond the cap is refused
    (503 with ``Retry-After``) before it starts. The count lives in the event loop's thread
    only, so it needs no lock.
    """

    def __init__(self) -> None:
        self.count = 0

    @contextmanager
    def slot(self, cap: int) -> Iterator[None]:
        """Hold one of ``cap`` places while the block runs; :class:`AtCapacity` if none is free."""
        if self.count >= cap:
            raise AtCapacity(
                f"this server has {cap} event streams open, as many as it serves; retry shortly",
                headers={"Retry-After": str(STREAMS_RETRY_AFTER_S)},
            )
        self.count += 1
        try:
            yield
        finally:
            self.count -= 1


OPEN_STREAMS = OpenStreams()  # one per process
