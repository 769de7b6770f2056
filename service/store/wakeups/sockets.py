"""Wake-ups on one machine (SQLite): Unix datagram sockets in a folder next to the database.

Each listening process binds one socket, ``<db file>.wake/<topics>-<pid>-<random>.sock``; a
publisher sends a datagram (``topic\\nkey``) to every socket of that topic once its
transaction has committed. Sending never blocks: a receiver whose queue is full misses that
wake-up (its fallback timeout covers it), and a socket nobody is bound to any more (its process
died) is removed by the first publisher that meets it.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy.orm import Session

from service.store.wakeups import stage_after_commit
from service.store.wakeups.waiters import Listener

log = logging.getLogger("service.wakeups")

MAX_DATAGRAM = 512  # a topic and a job id, with room to spare
# How often an idle listener checks that its socket is still there (the folder may have been
# removed, e.g. by a cleanup): when it is gone, it binds a new one.
CHECK_S = 5.0
# A socket's path must fit sockaddr_un (108 bytes on Linux); longer ones are reached through
# the folder's descriptor in /proc.
MAX_PATH_BYTES = 100


@contextmanager
def _addresses(folder: Path) -> Iterator[str]:
    """The prefix for sockets' addresses in ``folder``: the folder itself, or, when its path
    is too long for an address, ``/proc/self/fd/N`` of a descriptor open on it."""
    if len(os.fsencode(folder)) + 40 <= MAX_PATH_BYTES:
        yield str(folder)
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _topics_of(name: str) -> list[str]:
    return name.split("-", 1)[0].split("+") if name.endswith(".sock") else []


class SocketPublisher:
    """Sends a committed transaction's wake-ups to the sockets in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)

    def stage(self, session: Session, topic: str, key: str) -> None:
        """Kept until the transaction commits."""
        stage_after_commit(session, topic, key)

    def seal(self, session: Session) -> None:
        """Nothing goes through the database."""

    def send(self, wakes: set[tuple[str, str]]) -> None:
        """One datagram per wake-up to each socket of its topic; never blocks, never raises."""
        try:
            names = os.listdir(self.folder)
        except OSError:
            return  # no listener has made the folder: nobody waits
        try:
            with _addresses(self.folder) as prefix:
                for name in names:
                    topics = _topics_of(name)
                    for topic, key in wakes:
                        if topic in topics and not self._send_one(prefix, name, topic, key):
                            break
        except OSError as exc:  # the folder went away under us: nobody to wake
            log.debug("wake-ups not sent: %s", exc)

    def _send_one(self, prefix: str, name: str, topic: str, key: str) -> bool:
        """Send; False when the socket is stale (and now removed) or gone."""
        try:
            self._sock.sendto(f"{topic}\n{key}".encode(), f"{prefix}/{name}")
        except ConnectionRefusedError:  # nobody is bound to it: its process died
            (self.folder / name).unlink(missing_ok=True)
            return False
        except FileNotFoundError:
            return False
        except OSError:  # its queue is full (it is busy): its timeout covers this one
            pass
        return True


class SocketListener(Listener):
    """This process's socket in ``folder`` and the thread that reads it."""

    def __init__(self, folder: Path, topics: Sequence[str]) -> None:
        super().__init__()
        self.folder = folder
        self.name = f"{'+'.join(topics)}-{os.getpid()}-{secrets.token_hex(4)}.sock"
        self._closed = False
        self._unreachable = False  # the folder could not be searched at the last check
        self._sock = self._bind()
        self._thread = threading.Thread(target=self._run, name="wakeups", daemon=True)
        self._thread.start()

    def _bind(self) -> socket.socket:
        self.folder.mkdir(exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with _addresses(self.folder) as prefix:
            sock.bind(f"{prefix}/{self.name}")
        sock.settimeout(CHECK_S)
        self.connected.set()
        return sock

    def _run(self) -> None:
        try:
            while not self._closed:
                try:
                    data = self._sock.recv(MAX_DATAGRAM)
                except TimeoutError:
                    self._rebind_if_gone()
                    continue
                except OSError:
                    if not self._closed:
                        log.exception("wake-ups: %s failed; polling from now on", self.name)
                    return
                topic, _, key = data.decode(errors="replace").partition("\n")
                if topic:
                    self.deliver(topic, key)
        finally:
            self._sock.close()

    def _rebind_if_gone(self) -> None:
        """A socket file removed under a running listener is rebound (wake-ups sent while it
        was gone were lost: the waiters are woken to look again). A folder that cannot be
        searched (its permissions) is looked at again at the next check, and its waiters woken
        once it can: the error ended the thread, and wake-ups never came back with the folder."""
        try:
            there = (self.folder / self.name).exists()
        except OSError as exc:  # no publisher can reach the socket either
            if not self._unreachable:
                log.warning("wake-ups: cannot look in %s (%s); polling", self.folder, exc)
                self.connected.clear()
            self._unreachable = True
            return
        was_unreachable, self._unreachable = self._unreachable, False
        if there and was_unreachable:
            log.info("wake-ups: %s can be reached again", self.folder)
            self.connected.set()
            self.deliver_all()
        if there or self._closed:
            return
        self.connected.clear()
        try:
            sock = self._bind()
        except OSError as exc:
            log.warning("wake-ups: cannot bind a socket in %s (%s); polling", self.folder, exc)
            return
        old, self._sock = self._sock, sock
        old.close()
        log.info("wake-ups: %s was removed; listening again", self.folder / self.name)
        self.deliver_all()

    def close(self) -> None:
        """Stop the thread and remove the socket."""
        if self._closed:
            return
        self._closed = True
        self.connected.clear()
        try:  # an empty datagram to itself ends the thread's recv
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as poke:
                poke.setblocking(False)
                with _addresses(self.folder) as prefix:
                    poke.sendto(b"", f"{prefix}/{self.name}")
        except OSError:  # the socket is gone: the thread ends at its next check
            pass
        self._thread.join(timeout=1.0)
        (self.folder / self.name).unlink(missing_ok=True)
