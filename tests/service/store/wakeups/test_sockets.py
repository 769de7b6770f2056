"""SQLite's wake-ups: datagram sockets in a folder; stale ones removed, a removed one rebound."""

from __future__ import annotations

import shutil
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from service.store.wakeups import JOB_PROGRESS, JOB_QUEUED, sockets
from service.store.wakeups.sockets import SocketListener, SocketPublisher
from tests.support import wait_for

WOKEN_WITHIN_S = 10.0


def test_a_publisher_wakes_the_listeners_of_its_topic(tmp_path: Path) -> None:
    folder = tmp_path / "mnist.db.wake"
    with (
        SocketListener(folder, [JOB_QUEUED]) as workers,
        SocketListener(folder, [JOB_PROGRESS]) as api,
        workers.subscribe(JOB_QUEUED) as queued,
        api.subscribe(JOB_PROGRESS, "job") as news,
    ):
        SocketPublisher(folder).send({(JOB_PROGRESS, "job")})
        assert news.wait(WOKEN_WITHIN_S)
        assert not queued.wait(0.2)
    assert list(folder.iterdir()) == [], "a closed listener left its socket"


def test_a_socket_nobody_listens_on_is_removed_by_the_next_publisher(tmp_path: Path) -> None:
    folder = tmp_path / "mnist.db.wake"
    with SocketListener(folder, [JOB_QUEUED]) as live, live.subscribe(JOB_QUEUED) as queued:
        dead = folder / "queued-1-dead.sock"  # what a killed process leaves behind
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(str(dead))
        assert dead.exists()
        SocketPublisher(folder).send({(JOB_QUEUED, "")})
        assert not dead.exists()
        assert queued.wait(WOKEN_WITHIN_S), "the live listener missed the wake-up"


def test_a_removed_folder_is_made_again_and_its_waiters_woken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sockets, "CHECK_S", 0.1)
    folder = tmp_path / "mnist.db.wake"
    with SocketListener(folder, [JOB_QUEUED]) as listener, listener.subscribe(JOB_QUEUED) as w:
        shutil.rmtree(folder)  # wake-ups sent now are lost: nobody is there
        SocketPublisher(folder).send({(JOB_QUEUED, "")})
        # Rebound, the listener wakes its waiters once: they look at the database again.
        assert w.wait(WOKEN_WITHIN_S)
        assert (folder / listener.name).exists()
        SocketPublisher(folder).send({(JOB_QUEUED, "")})
        assert w.wait(WOKEN_WITHIN_S)


def test_a_folder_that_cannot_be_searched_for_a_while_keeps_the_listener(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its folder at mode 000 (root without CAP_DAC_OVERRIDE): the check's PermissionError
    ended the thread, and wake-ups never came back once the folder did. The look is made to
    fail rather than the mode changed (root passes it)."""
    monkeypatch.setattr(sockets, "CHECK_S", 0.1)
    folder = tmp_path / "mnist.db.wake"
    real_exists = Path.exists
    blocked = threading.Event()

    def exists(self: Path, **kwargs: Any) -> bool:
        if blocked.is_set() and self.parent == folder:
            raise PermissionError(13, "Permission denied", str(self))
        return real_exists(self, **kwargs)

    monkeypatch.setattr(Path, "exists", exists)
    with SocketListener(folder, [JOB_QUEUED]) as listener, listener.subscribe(JOB_QUEUED) as w:
        blocked.set()
        wait_for(lambda: not listener.connected.is_set(), timeout_s=10, what="a failed look")
        blocked.clear()
        # Reachable again, the listener wakes its waiters once (wake-ups sent meanwhile were
        # lost), and the next wake-up arrives.
        assert w.wait(WOKEN_WITHIN_S)
        assert listener.connected.is_set()
        SocketPublisher(folder).send({(JOB_QUEUED, "")})
        assert w.wait(WOKEN_WITHIN_S)


def test_a_folder_too_deep_for_a_socket_address_still_works(tmp_path: Path) -> None:
    folder = tmp_path / ("d" * 60) / ("e" * 60) / "mnist.db.wake"
    folder.parent.mkdir(parents=True)
    assert len(str(folder / "queued-1234567-abcdefgh.sock")) > 108  # beyond sockaddr_un
    with SocketListener(folder, [JOB_QUEUED]) as listener, listener.subscribe(JOB_QUEUED) as w:
        SocketPublisher(folder).send({(JOB_QUEUED, "")})
        assert w.wait(WOKEN_WITHIN_S)


def test_a_publisher_without_listeners_does_nothing(tmp_path: Path) -> None:
    SocketPublisher(tmp_path / "never-made").send({(JOB_QUEUED, "")})
    assert not (tmp_path / "never-made").exists()


def test_waiters_fall_back_to_their_timeout(tmp_path: Path) -> None:
    folder = tmp_path / "mnist.db.wake"
    with SocketListener(folder, [JOB_QUEUED]) as listener, listener.subscribe(JOB_QUEUED) as w:
        wait_for(lambda: not w.wait(0.05), timeout_s=5, what="a wait that times out")
