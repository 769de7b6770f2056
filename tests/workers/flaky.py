"""Sessions that fail as a database that is down does, on a test's say."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast

from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker


def outage_error() -> sa_exc.OperationalError:
    """What SQLAlchemy raises when SQLite cannot write its file."""
    error = sqlite3.OperationalError("disk I/O error")
    error.sqlite_errorcode = 10  # SQLITE_IOERR, as SQLite sets it
    return sa_exc.OperationalError("INSERT …", None, error)


class FlakyDatabase:
    """A stand-in for a sessionmaker whose ``begin()`` fails while ``down``."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        self.down = False
        self.break_after_commit = False  # the next commit lands, but its answer is lost
        self.tries = 0

    @contextmanager
    def begin(self) -> Iterator[Session]:
        """A write transaction, or the outage's error."""
        self.tries += 1
        if self.down:
            raise outage_error()
        with self.sessions.begin() as session:
            yield session
        if self.break_after_commit:
            self.break_after_commit = False
            raise outage_error()

    def sessionmaker(self) -> sessionmaker[Session]:
        """This object, typed as what workers and reporters take."""
        return cast(sessionmaker[Session], self)
