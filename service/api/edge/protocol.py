"""The HTTP edge: uvicorn's httptools protocol with the limits uvicorn itself does not enforce.

uvicorn bounds neither the header block (httptools grows a header value by concatenation, so
a huge header costs CPU in the square of its size) nor the time a client may take to send its
headers or its body, or to take its answer: stalled connections stay open for good. Its
``limit_concurrency`` answers plain text without ``Retry-After``, after parsing the request.
Rather than another server (and another deployment, process model and metrics sharing),
:class:`EdgeProtocol` is the same protocol (``uvicorn.run(http=EdgeProtocol)``), with:

- the header block (request line and headers) fed to the parser at most
  ``max_header_bytes`` at a time: a block that does not end within them gets 431, and a
  request target over ``max_request_line_bytes`` gets 414, before the app sees anything (a
  block that begins in the read where the request before it ends may pass the cap by the
  rest of that read: the parser does not say where in a read a request ends);
- a header deadline, from a connection's first moment (or a keep-alive request's first byte)
  to the end of its headers, and a body deadline, the longest silence while a body is read,
  and its least pace (:class:`~service.api.edge.server.BodyPace`; neither counted while the
  server itself has stopped reading, or owes a ``100 Continue``): 408, or a plain close for a
  connection that never sent a byte;
- a send deadline (:class:`~service.api.edge.server.SendDeadline`): a client that takes none of
  its answer for ``send_timeout_s`` while some of it waits to be sent is reset (its app task,
  the answer's buffer and its place among the capped connections were held for good);
- a cap on open connections per process, checked as a connection is accepted: beyond it 503
  with ``Retry-After``, before a byte is parsed;
- the service's JSON envelope on the protocol's own answers (400 for a malformed request,
  and the refusals of a request's head, :mod:`.heads`); an ``Upgrade`` is a plain request;
- an answer of no length to an HTTP/1.0 client ended by the close, not chunked;
- a client's half-close taken as the end of its requests, not as its leaving
  (:meth:`EdgeProtocol.eof_received`).

A refused connection is answered, then half-closed: what the client still sends is read and
dropped for a moment (closing with unread data would reset the connection, and the client
could lose the answer), then closed. Requests pipelined before the refused one are answered
first, in order, as a client pairs answers with its requests.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from typing import Any, cast

import httptools
from starlette.types import Scope
from uvicorn._types import ASGI3Application as ASGI3App
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from service.api.edge import heads
from service.api.edge.quick import front_of, send_whole, service_hooks
from service.api.edge.server import (
    BodyPace,
    SendDeadline,
    close_delimited,
    error_response,
    fresh_headers,
    process_limits,
)
from service.errors import (
    AtCapacity,
    BadRequest,
    HeaderTooLarge,
    RequestTimeout,
    ServiceError,
    UriTooLong,
)

log = logging.getLogger("service.edge")

RETRY_AFTER_S = 1  # a refused connection may try again this soon
AT_CAPACITY = "the server has as many connections open as it accepts; retry shortly"
LINGER_S = 1.0  # how long a refused connection's further bytes are read and dropped

HEAD, BODY = 0, 1  # what the parser reads now: a header block (or nothing yet), or a body


class EdgeProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with caps on the header block and on connections, and
    deadlines on headers and bodies (see the module's docstring)."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.settings, self.max_connections = process_limits()
        self.phase = HEAD
        self.head_bytes = 0  # of the header block being read
        self.block_at_start = False  # whether that block began at the read's first byte
        self.url_bytes = 0
        self.body = BodyPace(self.settings.body_timeout_s)
        self.deadline: asyncio.TimerHandle | None = None
        self.sending = SendDeadline(self.loop, self.settings.send_timeout_s)
        self.refused = False
        self.owed: ServiceError | None = None  # a refusal waiting for earlier answers
        self.front = front_of(self.app)  # the app's quick answers (service/api/edge/quick.py)
        self.answering = False  # while a quick answer is being given
        self.read_closed = False  # the client half-closed: it sends nothing more
        # The request whose app task started last: uvicorn tells only the latest one read
        # (``cycle``) that the client has gone, and this one would write on to a closed socket.
        self.running: RequestResponseCycle | None = None
        self.is_event_stream, self.metrics = service_hooks(self.app)

    # -- connections ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Refuse beyond the connection cap; otherwise start the header deadline."""
        if len(self.connections) >= self.max_connections:
            self.transport = transport
            self.refuse(AtCapacity(AT_CAPACITY, retry_after_s=RETRY_AFTER_S))
            return
        super().connection_made(transport)
        self._arm(self.settings.header_timeout_s, self._header_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        """Drop any deadline with the connection; tell the request being answered that the
        client has gone, as uvicorn tells the latest one read."""
        self._disarm()
        self.sending.stop()
        super().connection_lost(exc)
        running = self.running
        if running is not None and not running.response_complete:
            running.disconnected = True
            running.message_event.set()

    def eof_received(self) -> bool | None:  # type: ignore[override]  # asyncio's signature
        """The client sends nothing more (a half-close, as conformance probes and some
        command-line clients send after their requests), which is not a disconnect (RFC 9112,
        section 9.6): the requests read whole are answered, in order, then the connection is
        closed (uvicorn closed it at once, losing every answer not yet written in full); a
        request the end of data cut short is answered nothing. True keeps the connection open
        for that. A connection holding an event stream (running, or waiting its turn) ends
        here: a browser closing a stream sends the same, and the stream would hold its capped
        place until its next write. That bound remains for a request pipelined behind a
        running stream: uvicorn stops reading then."""
        self.read_closed = True
        self._disarm()  # no byte can arrive now: the header and body deadlines are moot
        if self.refused and self.owed is None:
            return None  # the refusal was answered: its linger ends with the client's data
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            return None  # nothing owed (a header block cut short gets nothing): close now
        if self._holds_event_stream():
            return None  # the client is taken to have left (above)
        if self.phase == BODY and not self.refused:  # its body can never be whole
            if self.pipeline and self.pipeline[0][0] is cycle:  # while it waits: never to run
                self.pipeline.popleft()
                cycle.disconnected = True
                return True  # owed: the requests before it
            cycle.disconnected = True  # the app reads a disconnect, and its answer goes nowhere
            cycle.message_event.set()
            return None
        return True

    def _holds_event_stream(self) -> bool:
        """Whether a request read whole and not yet answered in full is an event stream's."""
        if self.is_event_stream is None:
            return False
        owed = [cycle for cycle, _ in self.pipeline]
        if self.running is not None and not self.running.response_complete:
            owed.append(self.running)
        return any(self.is_event_stream(cycle.scope) for cycle in owed)

    # -- reading ----------------------------------------------------------------------------

    def data_received(self, data: bytes, *, cut: bool = False) -> None:
        """Feed the parser, a header block at most ``max_header_bytes`` at a time (``cut``:
        ``data`` is the rest of a read past that, a request may have begun anywhere before)."""
        if self.refused:
            return  # read and dropped until the connection closes
        fresh_headers(self.server_state, self.config)  # the Date of what this may answer
        self._unset_keepalive_if_required()
        if self.phase == HEAD:
            self.block_at_start = not (cut or self.head_bytes)
            room = self.settings.max_header_bytes - self.head_bytes
            if len(data) > room:
                self.head_bytes += room
                if not self._feed(data[:room]):
                    return
                if self.phase == HEAD and self.head_bytes:  # the block did not end within the cap
                    limit = self.settings.max_header_bytes
                    self.refuse(HeaderTooLarge(f"the request's header block is over {limit} bytes"))
                    return
                self.data_received(data[room:], cut=True)  # a body, or the next block, counted
                return
            self.head_bytes += len(data)
        if not self._feed(data) or self.deadline is not None:
            return
        if self.phase == BODY:
            self._arm(self.body.left(self.loop.time()), self._body_timed_out)
        elif self.head_bytes:  # a keep-alive connection's next request has begun
            self._arm(self.settings.header_timeout_s, self._header_timed_out)

    def _feed(self, data: bytes) -> bool:
        """Parse ``data``; False when the connection was answered (refused) meanwhile."""
        if self.phase == BODY:
            self.body.came(self.loop.time(), len(data))
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            self.refuse(cause.error if isinstance(cause, heads.Refused) else heads.malformed(b""))
        except httptools.HttpParserUpgrade as upgrade:  # as uvicorn's own protocol does
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            elif rest := data[upgrade.args[0] :]:  # a plain request (ws="none"): the next one's
                return self._feed(rest)
        except httptools.HttpParserError as exc:
            began = self.phase == HEAD and self.block_at_start  # its line is this read's start
            self.refuse(heads.malformed(data if began and heads.of_method(exc) else b""))
        return not self.refused

    def send_400_response(self, msg: str) -> None:
        """uvicorn's own 400, in the service's envelope."""
        self.refuse(BadRequest(msg))

    # -- parser callbacks -------------------------------------------------------------------

    def on_url(self, url: bytes) -> None:
        """Count the request target as it streams in: 414 past its cap."""
        self.url_bytes += len(url)
        if self.url_bytes > self.settings.max_request_line_bytes:
            limit = self.settings.max_request_line_bytes
            raise heads.Refused(UriTooLong(f"the request target is longer than {limit} bytes"))
        super().on_url(url)

    def on_headers_complete(self) -> None:
        """The header deadline is met; the body's (if any) begins, unless the head is refused
        (:mod:`.heads`)."""
        self._disarm()
        if error := heads.refusal(self.headers, self.parser.get_http_version()):
            raise heads.Refused(error)
        self.phase = BODY
        self.body.begin(self.loop.time())
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        """The request is read whole: the next one's header block starts from nothing."""
        self._disarm()
        self.phase = HEAD
        self.head_bytes = self.url_bytes = 0
        self.block_at_start = False  # the next block begins further in the read, if in it
        super().on_message_complete()

    # -- answering --------------------------------------------------------------------------

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3App) -> None:
        """Answer here what the app answers at once (:mod:`service.api.edge.quick`); start the app's
        task for anything else. A request starts here as it is parsed, or as the previous
        response ends (pipelined). What was pipelined after a response that closed the
        connection is dropped, as uvicorn drops it; a keep-alive timer a quick answer armed in
        this read is stopped, as uvicorn stops it when data arrives; a request started by a
        quick answer's own end goes the app's way (not nesting one call in the other for every
        request pipelined). Bytes the parser refuses after a poll get their 400 after the
        poll's answer, either way (:meth:`refuse`)."""
        if self.transport.is_closing():
            return
        self._unset_keepalive_if_required()
        front = None if self.answering or app is not self.app else self.front
        if front is not None and not cycle.flow.write_paused:
            self.answering = True
            try:
                if front(cast(Scope, cycle.scope), partial(send_whole, cycle, self.transport)):
                    return
            except Exception:
                if cycle.response_started:  # half an answer is none: nothing more can go on here
                    log.exception("a quick answer could not be sent; the connection is closed")
                    self.transport.close()
                    return
                log.exception("a quick answer failed; the app answers instead")
            finally:
                self.answering = False
        self.running = cycle
        super()._start_asgi_task(cycle, partial(self._watched, app, cycle))

    async def _watched(
        self, app: ASGI3App, cycle: RequestResponseCycle, scope: Any, receive: Any, send: Any
    ) -> None:
        """The app, its answers framed for the client's version; where it fails mid-answer,
        uvicorn closes the connection, and a close waits for what was written to be sent: the
        send deadline watches that."""
        if scope["http_version"] == "1.0":
            send = close_delimited(cycle, send)
        try:
            await app(scope, receive, send)
        except BaseException:
            self.sending.watch(self.transport)
            raise

    def on_response_complete(self) -> None:
        """The next pipelined request, as uvicorn starts it; after the last answer owed, the
        refusal that waited for it (:meth:`refuse`), or the close of a connection that the
        client half-closed (:meth:`eof_received`)."""
        last = not self.pipeline
        super().on_response_complete()
        self.sending.watch(self.transport)  # the answer's tail, if the client has not taken it
        if not last:
            return
        if self.owed is not None:
            error, self.owed = self.owed, None
            self._answer_refusal(error)
        elif self.read_closed:
            self._unset_keepalive_if_required()  # armed by uvicorn: nothing more will come
            self.transport.close()

    # -- deadlines --------------------------------------------------------------------------

    def _arm(self, delay_s: float, handler: Any) -> None:
        self._disarm()
        self.deadline = self.loop.call_later(delay_s, handler)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _header_timed_out(self) -> None:
        self.deadline = None
        if self.phase != HEAD or self.refused:
            return
        if not self.head_bytes and self.cycle is None:
            self.transport.close()  # a connection that never said a word: nobody to answer
            return
        limit = self.settings.header_timeout_s
        self.refuse(RequestTimeout(f"the request's headers did not arrive within {limit:g} s"))

    def _body_timed_out(self) -> None:
        self.deadline = None
        if self.phase != BODY or self.refused:
            return
        now = self.loop.time()
        if self.flow.read_paused or self.cycle.waiting_for_100_continue:
            self.body.excuse(now)
        if (left := self.body.left(now)) > 0:
            self._arm(left, self._body_timed_out)
            return
        self.refuse(RequestTimeout(self.body.why(now)))

    def pause_writing(self) -> None:
        """The client takes its answer slower than it is written (asyncio's buffer is past its
        high-water mark, and the app's next write waits): the send deadline starts."""
        if self.flow is not None:  # None on a connection refused at the cap
            super().pause_writing()
        self.sending.watch(self.transport)

    def resume_writing(self) -> None:
        """The client has taken what was waiting: no deadline while the app writes, but for
        the tail of an answer complete (:meth:`on_response_complete`)."""
        self.sending.stop()
        if self.flow is not None:
            super().resume_writing()
        if self.running is None or self.running.response_complete:
            self.sending.watch(self.transport)

    # -- refusing ---------------------------------------------------------------------------

    def refuse(self, error: ServiceError) -> None:
        """Stop reading, and answer ``error`` and close: once the requests read before it have
        been answered, where the refused one is the next request's header block or the body of
        a request waiting for its turn; in place of the request itself where its body failed
        as it was being answered (only close, once its response has begun)."""
        self.refused = True
        self._disarm()
        heads.note_refusal(self.metrics, self.transport.get_extra_info("peername"), error)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if self.phase == HEAD:  # read whole, and owed its answer (and the ones before it)
                self.owed = error
                return
            if self.pipeline and self.pipeline[0][0] is cycle:  # its body, while it waits
                self.pipeline.popleft()  # never to run: the refusal is its answer
                cycle.disconnected = True
                self.owed = error
                return
            cycle.disconnected = True  # the app reads a disconnect, and its answer goes nowhere
            cycle.message_event.set()
            if cycle.response_started:
                self.sending.watch(self.transport)  # what was written of it waits for the client
                self.transport.close()
                return
        self._answer_refusal(error)

    def _answer_refusal(self, error: ServiceError) -> None:
        self._unset_keepalive_if_required()  # armed by uvicorn after an answer: the linger's
        if self.transport.is_closing():
            return
        self.transport.write(error_response(error, fresh_headers(self.server_state, self.config)))
        if self.transport.can_write_eof() and not self.read_closed:
            self.transport.write_eof()
            if self.flow is not None:
                self.flow.resume_reading()
            self.deadline = self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()
