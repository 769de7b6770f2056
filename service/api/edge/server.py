"""uvicorn's server, asleep while idle: what ``python -m service`` runs, in one process or several.

uvicorn's main loop wakes every 0.1 s to see whether it should exit, and refreshes the ``Date``
header every tenth time. On a host where an idle process's memory goes cold, each such wake
cost milliseconds of CPU: an idle API took 1.7–4.4% of a core where the goal is 1%
(docs/benchmarks.md, Time to result). :class:`QuietServer` is the same server whose main loop
sleeps until it is asked to exit; the header is refreshed as requests come instead
(:func:`fresh_headers`, called by the service's protocol, :mod:`.protocol`, and by the
benchmarks' baseline protocol). With several processes, uvicorn's own supervisor runs
:class:`QuietProcess` children, which serve with it; the supervisor still pings each child
every 0.5 s, as uvicorn does.

How many client connections a process accepts is worked out here too:
``MNIST_MAX_CONNECTIONS``, under the process's descriptor limit (the edge refuses beyond it);
and what the edge needs of a connection below HTTP: its own answers' bytes, what its client
has yet to take, and the deadline for taking it (:class:`SendDeadline`); the framing of an
answer to an HTTP/1.0 client (:func:`close_delimited`); when a request's body is late
(:class:`BodyPace`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import resource
import socket
import struct
import sys
import termios
import time
import weakref
from email.utils import formatdate
from functools import lru_cache

from starlette.types import Message, Send
from uvicorn.config import STARTUP_FAILURE, Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, RequestResponseCycle
from uvicorn.server import Server, ServerState
from uvicorn.supervisors import multiprocess
from uvicorn.supervisors.multiprocess import Multiprocess

from service.errors import ServiceError
from service.settings import Settings, get_settings

# The longest an idle server sleeps: asking it to exit wakes it, so this only bounds the wait
# should a wake-up ever be missed.
TICK_S = 30.0
log = logging.getLogger("service.edge")
_DATE_SECOND: weakref.WeakKeyDictionary[ServerState, int] = weakref.WeakKeyDictionary()


def fresh_headers(state: ServerState, config: Config) -> list[tuple[bytes, bytes]]:
    """The server's default headers, their ``Date`` of this second: refreshed when a request
    comes in a new second, which costs it a clock reading otherwise (uvicorn's tick refreshed
    them every second, waking an idle server to do so)."""
    now = time.time()
    if _DATE_SECOND.get(state) != int(now):
        _DATE_SECOND[state] = int(now)
        date = [(b"date", formatdate(now, usegmt=True).encode())] if config.date_header else []
        state.default_headers = date + config.encoded_headers
    return state.default_headers


class QuietServer(Server):
    """A server whose main loop sleeps until it is asked to exit (or :data:`TICK_S` passes).

    Every way uvicorn asks its server to exit sets ``should_exit`` (a signal's
    ``handle_exit``, or code that holds the server), so setting it wakes the loop.
    """

    def __init__(self, config: Config) -> None:
        self._wake: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
        self._should_exit = False
        super().__init__(config)

    @property
    def should_exit(self) -> bool:
        """uvicorn's flag; setting it wakes the main loop."""
        return self._should_exit

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        self._should_exit = value
        if value and self._wake is not None:
            loop, asked = self._wake
            with contextlib.suppress(RuntimeError):  # the loop has closed: nothing waits
                loop.call_soon_threadsafe(asked.set)

    async def main_loop(self) -> None:
        """uvicorn's ticks, :data:`TICK_S` apart, cut short when asked to exit. Tick 1: not
        uvicorn's once-a-second work (the Date header, fresh per request here; a process
        manager's notify callback, which this service never sets), only its exit checks."""
        asked = asyncio.Event()
        self._wake = (asyncio.get_running_loop(), asked)
        while not await self.on_tick(1):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asked.wait(), TICK_S)


class QuietProcess(multiprocess.Process):
    """A child of uvicorn's supervisor that serves with :class:`QuietServer`."""

    @property
    def server(self) -> Server:
        """uvicorn's property, with the quiet server."""
        if self._server is None:
            self._server = QuietServer(config=self.config)
        return self._server


def serve(config: Config) -> None:
    """What ``uvicorn.run`` does with the service's ``config`` (one process, or
    ``config.workers`` under uvicorn's supervisor, which binds the socket they share), with
    quiet servers. The service never reloads, listens on a Unix socket (uvicorn.run's other
    paths), limits a process's requests or notifies a process manager (which the quiet main
    loop would check only every :data:`TICK_S`)."""
    if config.should_reload or config.uds is not None:
        raise ValueError("the service's server neither reloads nor listens on a Unix socket")
    if config.limit_max_requests is not None or config.callback_notify is not None:
        raise ValueError("the quiet server checks a request limit or a notify callback rarely")
    if config.workers > 1:
        sock = config.bind_socket()
        # The supervisor makes its children (and replaces dead ones) by this module name.
        uvicorns = multiprocess.Process
        multiprocess.Process = QuietProcess  # type: ignore[misc]
        try:
            with contextlib.suppress(KeyboardInterrupt):
                Multiprocess(config, sockets=[sock]).run()
        finally:
            multiprocess.Process = uvicorns  # type: ignore[misc]
        return
    server = QuietServer(config)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)


# Descriptors kept for everything but client connections: the database, files, the
# interpreter's own. The connection cap is lowered to fit under the limit less these.
FD_HEADROOM = 256


def raise_fd_limit() -> int:
    """Raise this process's soft descriptor limit to its hard limit; return the new soft limit.

    So that the connection cap, not the descriptor limit, decides when connections are refused:
    at the descriptor limit the server can accept nothing, and a client gets no answer at all.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft
        return hard
    return soft


def connection_cap(settings: Settings, fd_limit: int) -> int:
    """``MNIST_MAX_CONNECTIONS``, lowered to fit under the descriptor limit where it must."""
    if fd_limit == resource.RLIM_INFINITY:
        return settings.max_connections
    return max(1, min(settings.max_connections, fd_limit - FD_HEADROOM))


@lru_cache(maxsize=1)
def process_limits() -> tuple[Settings, int]:
    """The settings and the connection cap of this process, worked out once."""
    settings = get_settings()
    return settings, connection_cap(settings, resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def error_response(error: ServiceError, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """A whole HTTP/1.1 response carrying ``error`` in the service's envelope, closing."""
    body = json.dumps(error.envelope()).encode()
    lines = [STATUS_LINE[error.status_code]]
    headers = [
        *default_headers,
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in error.headers.items()),
        (b"connection", b"close"),
    ]
    lines.extend(name + b": " + value + b"\r\n" for name, value in headers)
    return b"".join([*lines, b"\r\n", body])


def close_delimited(cycle: RequestResponseCycle, send: Send) -> Send:
    """``send`` of ``cycle``, for an HTTP/1.0 client: an answer without a length (an event
    stream) ends with the connection (RFC 9112, section 6.3), where uvicorn chunks it, which
    must not be sent to a 1.0 client (section 6.1) and which a strict one or its proxy would
    hand on as the body. uvicorn closes a 1.0 connection after each answer already."""
    delimited = False

    async def framed(message: Message) -> None:
        nonlocal delimited
        if message["type"] == "http.response.start":
            named = {name.lower() for name, _ in message.get("headers", ())}
            if not named & {b"content-length", b"transfer-encoding"}:
                delimited = True
                cycle.chunked_encoding = False  # uvicorn's own length check, made moot
                cycle.expected_content_length = sys.maxsize
        elif delimited and not message.get("more_body", False):
            cycle.expected_content_length = len(message.get("body", b""))  # the last: all of it
        await send(message)

    return framed


def unsent_bytes(transport: asyncio.WriteTransport) -> int:
    """What a connection's client has yet to take: asyncio's buffer and, where the system says
    (Linux's ``SIOCOUTQ``), the socket's send queue. A client that reads slowly empties the
    queue first, which may hold megabytes: asyncio's buffer alone can stand still meanwhile."""
    unsent = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):
            queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, bytes(4))
            unsent += int(struct.unpack("i", queued)[0])
    return unsent


# A body's least bytes a second past its first body_timeout_s (as Apache's mod_reqtimeout's
# MinRate): a byte every few seconds held a connection, and its place under the cap, as long as
# its client liked; 60 such clients shut every other one out.
MIN_BODY_RATE = 500


class BodyPace:
    """When a request's body is late: silent for ``limit_s``, or behind :data:`MIN_BODY_RATE`
    on average once ``limit_s`` have passed since it began (times of the event loop)."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self.seen = 0.0  # its last bytes
        self.due = 0.0  # when it is late, less what its bytes have earned

    def begin(self, now: float) -> None:
        """The headers are read: the body begins."""
        self.seen, self.due = now, now + self.limit_s

    def came(self, now: float, size: int) -> None:
        """``size`` more bytes."""
        self.seen = now
        self.due += size / MIN_BODY_RATE

    def excuse(self, now: float) -> None:
        """The server is not reading, or owes a ``100 Continue``: not the client's fault."""
        self.seen, self.due = now, max(self.due, now + self.limit_s)

    def left(self, now: float) -> float:
        """Seconds before it is late; 0 or less once it is."""
        return min(self.seen + self.limit_s, self.due) - now

    def why(self, now: float) -> str:
        """What the client is told once it is late."""
        if self.seen + self.limit_s > now:  # not silent: too slow
            return f"the request body came slower than {MIN_BODY_RATE} bytes/s"
        return f"the request body stalled for {self.limit_s:g} s"


class SendDeadline:
    """A connection's send deadline: its client must take some of what waits to be sent
    within ``timeout_s``, and again from each time it does, or the connection is reset.

    Watched while asyncio's buffer holds some of an answer that nothing more will follow soon:
    while the app's writes wait (the buffer past its high-water mark), and once an answer is
    complete (its tail, under the mark, would otherwise hold the connection: a close waits for
    the buffer to be sent). A client that takes a little in every ``timeout_s``, however
    little, keeps its connection (as nginx's ``send_timeout``): the connection cap bounds how
    many may.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        self.loop, self.timeout_s = loop, timeout_s
        self.handle: asyncio.TimerHandle | None = None
        self.unsent = 0  # what the client had yet to take at the last look

    def watch(self, transport: asyncio.WriteTransport) -> None:
        """Start the deadline while something of the server's waits, unless it runs."""
        if self.handle is None and transport.get_write_buffer_size():
            self.unsent = unsent_bytes(transport)
            self.handle = self.loop.call_later(self.timeout_s, self._look, transport)

    def stop(self) -> None:
        """The client took what waited (or the connection has gone)."""
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def _look(self, transport: asyncio.WriteTransport) -> None:
        """Reset the connection if just as much waits as at the last look. Less: the client
        took some. More: the server wrote more (a complete answer's tail, then the next
        pipelined one), and it can't be told whether the client took any; the server's writes
        wait once the buffer is past its mark, and the next look judges the client alone. Either
        way the deadline starts again from now, if anything still waits."""
        self.handle = None
        if unsent_bytes(transport) != self.unsent or not transport.get_write_buffer_size():
            self.watch(transport)
            return
        log.warning("connection reset: its client took nothing for %g s", self.timeout_s)
        sock = transport.get_extra_info("socket")
        if sock is not None:  # a reset: a plain close keeps the kernel's queue for minutes
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
