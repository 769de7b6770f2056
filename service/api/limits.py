"""How much a client may send: the body cap and the multipart limits, enforced as bytes arrive
(how a JSON body is read is :mod:`service.api.json_bodies`).

``BodyLimitMiddleware`` counts the body as it streams in, whatever ``Content-Length`` says
(and for chunked uploads, which have none): a declared length over the cap is refused before
a byte of the body is read, and a body that grows past it is cut off at the first chunk too
many. Either way the client gets 413 in the service's envelope and the connection is closed,
so memory stays flat however much a client sends. Any other answer given before the body's end
(a route's own cap, a refusal before reading) closes the connection too
(:func:`service.api.asgi.closing`: uvicorn would otherwise read and drop the rest of it to keep
the connection, however long it goes on; a route's 413 at 10 MiB was followed by 2 GiB read).

Multipart bodies are also read by a :class:`MultipartGuard` as they pass: at most
``max_form_parts`` parts, text fields of at most ``max_form_field_bytes``, and python-multipart's
own bounds on part headers (at most 8 per part, about 4 KiB each). A form over these gets 400,
as Starlette answers for its own form limits: the form is malformed for this API, not merely
large (413 stays the answer to the byte caps). The limits hold for every
route, whatever its parameters; Starlette's per-call ``request.form()`` limits would need each
route to parse its own form.

The middleware stands in front of everything that reads a body, the fast lanes included
(``ServiceApp`` in :mod:`service.api.app`), and is the service's one multipart parser besides
Starlette's own: it leaves its guard in the scope, and a fast lane may ask it to keep the parts
of a small form (:meth:`MultipartGuard.collect`) instead of parsing the body a second time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MAX_BOUNDARY_LENGTH, parse_options_header
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.asgi import closing, header, send_error
from service.errors import BadRequest, PayloadTooLarge, ServiceError, UnsupportedMediaType

MULTIPART_GUARD_SCOPE_KEY = "mnist.multipart_guard"


def _check_not_encoded(scope: Scope) -> None:
    """415 for a body sent compressed (``Content-Encoding``: RFC 9110, section 15.5.16): no
    route decodes one, and each read the compressed bytes as the body (a gzipped JSON body was
    "not UTF-8 text"; a JSON body labelled ``br`` was taken as it was)."""
    for name, value in scope.get("headers", ()):
        if name == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
            coding = value.decode("latin-1").strip()
            raise UnsupportedMediaType(
                f"bodies are read as sent: Content-Encoding {coding!r} is not accepted"
            )


@dataclass(slots=True)
class Part:
    """One part of a form, as a collecting guard kept it."""

    # The parameters of its last Content-Disposition header (the one Starlette reads), or None.
    disposition: dict[bytes, bytes] | None = None
    chunks: list[bytes] = field(default_factory=list)


class MultipartGuard:
    """Counts the parts of one multipart body and the bytes of its text fields as they stream.

    Asked to (:meth:`collect`), it also keeps every part's disposition and data, and says when
    the closing delimiter was read (``ended``): what Starlette's parser, the same
    python-multipart over the same bytes, would hand the route.
    """

    def __init__(
        self,
        boundary: bytes,
        *,
        max_parts: int,
        max_field_bytes: int,
        charset: bytes | None = None,
    ) -> None:
        self.max_parts = max_parts
        self.max_field_bytes = max_field_bytes
        self.charset = charset  # the form's declared charset: Starlette decodes names with it
        self.parts = 0
        self.ended = False
        self.collected: list[Part] | None = None
        self._collect_budget = 0
        self._field_bytes = 0
        self._is_file = False
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._parser = MultipartParser(
            boundary,
            callbacks={
                "on_part_begin": self._part_begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value_data,
                "on_header_end": self._header_end,
                "on_part_data": self._part_data,
                "on_end": self._end,
            },
        )

    def collect(self, max_bytes: int) -> None:
        """Keep the parts fed from now on in ``collected``; give up (None) past ``max_bytes``
        of part data. Asked before the first byte is fed, by a fast lane that answers small
        forms itself."""
        self.collected = []
        self._collect_budget = max_bytes

    def feed(self, chunk: bytes) -> None:
        """Parse the next chunk; raises a :class:`ServiceError` as soon as a limit is passed."""
        if not chunk:
            return
        try:
            self._parser.write(chunk)
        except FormParserError as exc:  # the parser's words are not the client's (README)
            raise BadRequest(
                "the multipart body cannot be read: it is not parts between its boundary "
                "delimiters, each with well-formed headers"
            ) from exc

    def finish(self) -> None:
        """The body has ended: a form whose closing delimiter never came was cut short. (Read as
        it is, it lost its last part, and a form of one image was told it had none.)"""
        if not self.ended:
            raise BadRequest(
                "the multipart body ends before its closing delimiter (--boundary--): it was "
                "cut short"
            )

    def _part_begin(self) -> None:
        self.parts += 1
        if self.parts > self.max_parts:
            raise BadRequest(f"the form has more than {self.max_parts} parts")
        self._is_file = False
        self._field_bytes = 0
        if self.collected is not None:
            self.collected.append(Part())

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        # Header names are tokens (python-multipart refuses anything else): lowercased, as
        # Starlette compares them.
        if self._header_name.lower() == b"content-disposition":
            _, params = parse_options_header(bytes(self._header_value))
            self._is_file = b"filename" in params or b"filename*" in params
            if self.collected is not None:
                self.collected[-1].disposition = params
        self._header_name.clear()
        self._header_value.clear()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self.collected is not None:
            self._collect_budget -= end - start
            if self._collect_budget < 0:
                self.collected = None  # too large to keep: whoever asked reads it otherwise
            else:
                self.collected[-1].chunks.append(data[start:end])
        if self._is_file:
            return  # files are bounded by the body cap and by the route (MNIST_MAX_UPLOAD_BYTES)
        self._field_bytes += end - start
        if self._field_bytes > self.max_field_bytes:
            raise BadRequest(f"a form field is longer than {self.max_field_bytes} bytes")

    def _end(self) -> None:
        self.ended = True


def multipart_guard(scope: Scope, *, max_parts: int, max_field_bytes: int) -> MultipartGuard | None:
    """A guard for a ``multipart/form-data`` request with a boundary, else None."""
    content_type = header(scope, b"content-type")
    if content_type is None:
        return None
    kind, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        return None  # the app answers a multipart body without a boundary with its own 400
    try:
        return MultipartGuard(
            boundary,
            max_parts=max_parts,
            max_field_bytes=max_field_bytes,
            charset=params.get(b"charset"),
        )
    except (FormParserError, ValueError) as exc:  # e.g. a boundary over 256 bytes
        raise BadRequest(
            f"the multipart boundary is not usable ({len(boundary)} bytes; at most "
            f"{MAX_BOUNDARY_LENGTH})"
            if len(boundary) > MAX_BOUNDARY_LENGTH
            else "the multipart boundary is not usable"
        ) from exc


class BodyLimitMiddleware:
    """413 for bodies over ``max_body_bytes``, 400 for forms over the multipart limits."""

    def __init__(
        self, app: ASGIApp, *, max_body_bytes: int, max_form_parts: int, max_form_field_bytes: int
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_form_parts = max_form_parts
        self.max_form_field_bytes = max_form_field_bytes

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"the request body is larger than {self.max_body_bytes} bytes")

    def _judge_head(self, scope: Scope) -> MultipartGuard | None:
        """What the request's headers alone decide: a declared length over the cap, or a form's
        header the multipart limits refuse (raised); else the form's guard, if it is a form."""
        declared = header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise self._too_large()  # not a byte of it read
        _check_not_encoded(scope)
        return multipart_guard(
            scope, max_parts=self.max_form_parts, max_field_bytes=self.max_form_field_bytes
        )

    def refusal(self, scope: Scope) -> ServiceError | None:
        """Why the request's headers alone are refused, or None (its body, if any, is judged as
        it is read)."""
        try:
            self._judge_head(scope)
        except ServiceError as exc:
            return exc
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on with a ``receive`` that counts, and answer 413 when it refuses."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            guard = self._judge_head(scope)
        except ServiceError as exc:
            await send_error(send, exc, close=True)
            return
        if guard is not None:
            scope[MULTIPART_GUARD_SCOPE_KEY] = guard

        received = 0
        refusal: ServiceError | None = None
        response_started = False
        body_unread = announces_body(scope)

        # A refusal is raised from ``receive`` to stop the app reading: as a ServiceError, which
        # the app's own handlers answer (into ``guarded_send``) instead of taking it for a fault.
        async def counting_receive() -> Message:
            nonlocal received, refusal, body_unread
            if refusal is not None:
                raise refusal
            message = await receive()
            if message["type"] != "http.request":
                return message
            body_unread = body_unread and message.get("more_body", False)
            chunk: bytes = message.get("body", b"")
            received += len(chunk)
            if received > self.max_body_bytes:
                refusal = self._too_large()
            elif guard is not None:
                try:
                    guard.feed(chunk)
                    if received and not message.get("more_body", False):
                        guard.finish()  # an empty body the app answers (no image)
                except ServiceError as exc:
                    refusal = exc
            if refusal is not None:
                raise refusal
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if refusal is not None:
                return  # whatever the app makes of the aborted read, the answer is ours
            if message["type"] == "http.response.start":
                response_started = True
                if body_unread:  # answered before the body's end (a route's own 413, say)
                    message = closing(message)
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            # The app may let the refusal through or wrap it in its own errors (FastAPI turns a
            # failed body read into a 400); when we refused, any of them is the consequence.
            if refusal is None:
                raise
        if refusal is not None and not response_started:
            await send_error(send, refusal, close=True)


def announces_body(scope: Scope) -> bool:
    """Whether a request's head says a body follows: a length above 0, or a transfer coding."""
    declared = header(scope, b"content-length")
    if declared is not None:
        return not declared.isdigit() or int(declared) > 0
    return header(scope, b"transfer-encoding") is not None


def guard_of(scope: Scope) -> MultipartGuard | None:
    """The guard that reads this request's multipart body, if the middleware made one."""
    guard = scope.get(MULTIPART_GUARD_SCOPE_KEY)
    return guard if isinstance(guard, MultipartGuard) else None
