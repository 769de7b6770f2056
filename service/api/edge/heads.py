"""What the edge refuses in a request's head before the app sees it, by the HTTP/1.1 rules
that neither llhttp nor uvicorn applies: one ``Host`` (RFC 9112, section 3.2), no transfer
coding but chunked, and none in HTTP/1.0 (section 6.1); HTTP/1.1 and 1.0 only (llhttp takes
``HTTP/0.9`` with headers); and 501 rather than 400 for a method llhttp does not know (RFC 9110,
section 9.1)."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from typing import Any

import httptools

from service.api.metrics import EDGE_ROUTE, OTHER_METHOD
from service.errors import BadRequest, NotImplementedHere, ServiceError, VersionNotSupported

log = logging.getLogger("service.edge")

# A request line whose method is a token: one llhttp does not know is a method not implemented
# here, where other bytes (a TLS handshake sent to the plain port, say) are no HTTP at all.
REQUEST_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) [^ \r\n]+ HTTP/1\.[01]\r?\n")
SERVED_VERSIONS = ("1.1", "1.0")
NO_CODING = (b"", b"chunked")  # the transfer codings read: chunked (an empty one is no coding)


class Refused(Exception):
    """Raised from a parser callback to stop parsing and answer ``error``."""

    def __init__(self, error: ServiceError) -> None:
        super().__init__(error.message)
        self.error = error


def refusal(headers: Iterable[tuple[bytes, bytes]], http_version: str) -> ServiceError | None:
    """What a request of ``headers`` (names lowercased, as uvicorn keeps them) is refused
    with, if anything: 505 for a version but 1.1 and 1.0 (the rules below, and the framing of
    the answer, are theirs); 400 where an HTTP/1.1 request names no ``Host`` or any names two,
    or an HTTP/1.0 one has a ``Transfer-Encoding`` (its framing is then faulty: section 6.1);
    501 for a transfer coding but chunked, which llhttp reads as chunked all the same (``gzip,
    chunked``), so the app would take a compressed body for the plain one."""
    if http_version not in SERVED_VERSIONS:
        return VersionNotSupported(f"HTTP/{http_version} is not served: send HTTP/1.1")
    hosts = 0
    for name, value in headers:
        hosts += name == b"host"
        if name != b"transfer-encoding":
            continue
        if http_version == "1.0":
            return BadRequest("an HTTP/1.0 request has no Transfer-Encoding: send its length")
        if other := [c.strip() for c in value.lower().split(b",") if c.strip() not in NO_CODING]:
            coding = other[0].decode("latin-1")
            return NotImplementedHere(f"the transfer coding {coding!r} is not read here")
    if hosts > 1 or (hosts == 0 and http_version == "1.1"):
        return BadRequest("a request names one Host at most, an HTTP/1.1 one exactly")
    return None


def of_method(error: Exception) -> bool:
    """Whether llhttp refused a request for its method: one it does not know, or one of RTSP's
    (``DESCRIBE``, ``SETUP``…), which it knows but not in HTTP."""
    invalid = isinstance(error, httptools.HttpParserInvalidMethodError)
    return invalid or str(error).startswith("Invalid method")


def malformed(request: bytes) -> ServiceError:
    """What bytes llhttp refused are answered: 501 where ``request`` (given where they are
    known to begin a request refused for its method, the line whole in the block's first read,
    as clients send it) begins with a request line, 400 else (a line that came in pieces
    included: only a wait for its end could tell)."""
    if line := REQUEST_LINE.match(request):
        method = line.group(1).decode("ascii")
        return NotImplementedHere(f"the method {method[:64]!r} is not implemented here")
    return BadRequest("the request is not valid HTTP/1.1")


# Refusals of one status are logged once a second at most, with a count of those left out: a
# crowd of 3,000 slow clients, each refused, logged 6,560 lines in 40 s. (The event loop's
# thread alone calls this: no lock.)
REFUSALS_LOGGED_EVERY_S = 1.0
_refusal_logged_at: dict[int, float] = {}
_refusals_left_out: dict[int, int] = {}


def note_refusal(metrics: Any, peer: object, error: ServiceError) -> None:
    """Count a refusal of the edge (``metrics``: the app's ``ServiceMetrics``, if it has one)
    under the route ``<edge>``, and log it with the peer: each refusal closes its connection,
    so the log grows by one line a connection at most, and one a second for each status."""
    code = error.status_code
    if metrics is not None:
        metrics.requests.labels(OTHER_METHOD, EDGE_ROUTE, str(code)).inc()
    now = time.monotonic()
    if now - _refusal_logged_at.get(code, -REFUSALS_LOGGED_EVERY_S) < REFUSALS_LOGGED_EVERY_S:
        _refusals_left_out[code] = _refusals_left_out.get(code, 0) + 1
        return
    _refusal_logged_at[code] = now
    left_out = _refusals_left_out.pop(code, 0)
    more = f" (and {left_out} more refused {code} since the last such line)" if left_out else ""
    log.warning("refused %s: %d %s%s", peer, code, error.message, more)
