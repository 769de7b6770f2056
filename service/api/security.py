"""API keys: who may call what, decided before routing from the method and the path alone.

Rules (``required_access``), so that a route added later is covered without an edit here:

- public, no key: ``GET``/``HEAD`` of ``/healthz``, ``/readyz``, the dashboard page ``/``
  and its files under ``/static/``; ``/docs``, ``/redoc`` and ``/openapi.json`` too unless
  ``MNIST_DOCS_PUBLIC=false`` (they describe the API, which is no secret, and Swagger UI needs
  them to let a person type a key in);
- read: every other ``GET``/``HEAD``/``OPTIONS``, and ``POST /predict`` (and ``/predict/…``):
  the read-only key or the full key;
- write: everything else (``POST /jobs``, ``POST /jobs/{id}/cancel``, ``PUT``/``DELETE``
  ``/models/aliases/…``, …): the full key only; the read-only key gets 403.

The key travels as ``Authorization: Bearer <key>``. A browser's ``EventSource`` cannot set
headers, so ``GET /jobs/{id}/events`` may carry it as ``?access_token=`` instead (RFC 6750
§2.3), and no other request may (a key in a URL ends up in histories and proxies' logs: it is
taken only where there is no other way). The parameter, matched by its decoded name, is cut out
of every request before anything else (the app, the access log) sees it.

With no ``MNIST_API_KEY`` the API is open, which ``python -m service`` allows only on a
loopback address unless ``MNIST_ALLOW_NO_AUTH=true`` says so on purpose.
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
import re
from urllib.parse import unquote_to_bytes

from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.asgi import send_error
from service.errors import BadRequest, Forbidden, ServiceError, Unauthorized
from service.settings import Settings

REALM = "mnist"
PUBLIC_PATHS = frozenset({"/", "/healthz", "/readyz"})
PUBLIC_PREFIXES = ("/static/",)
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
PUBLIC_METHODS = frozenset({"GET", "HEAD"})
# POSTs that only read: a prediction changes nothing on the server.
READ_POST_PREFIXES = ("/predict",)


class Access(enum.IntEnum):
    """What a request needs; a key grants everything up to its own level."""

    PUBLIC = 0
    READ = 1
    WRITE = 2


def _plain(path: str) -> bool:
    # "/static/../jobs" must not ride on a public prefix: no dot segments, no empty segments.
    segments = path.split("/")[1:]
    return path.startswith("/") and all(s not in (".", "..") for s in segments) and "//" not in path


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def required_access(method: str, path: str, *, docs_public: bool = True) -> Access:
    """The access a request needs, from its method and its path inside the app."""
    method = method.upper()
    if method in PUBLIC_METHODS and _plain(path):
        if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            return Access.PUBLIC
        if docs_public and path in DOCS_PATHS:
            return Access.PUBLIC
    if method in READ_METHODS:
        return Access.READ
    if method == "POST" and any(_under(path, prefix) for prefix in READ_POST_PREFIXES):
        return Access.READ
    return Access.WRITE


def bearer_token(authorization: bytes | None) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` header (scheme case-insensitive)."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        return None
    return token


class KeyRing:
    """The configured keys, compared in constant time."""

    def __init__(self, full_key: str, readonly_key: str | None = None) -> None:
        self._full = full_key.encode()
        self._readonly = readonly_key.encode() if readonly_key is not None else None

    def grant(self, token: bytes) -> Access | None:
        """The access ``token`` grants, or None for an unknown token.

        Both keys are always compared, so the time taken says nothing about which one (if
        any) a guess came close to.
        """
        full = hmac.compare_digest(token, self._full)
        readonly = self._readonly is not None and hmac.compare_digest(token, self._readonly)
        if full:
            return Access.WRITE
        if readonly:
            return Access.READ
        return None


def _challenge(error: str | None = None) -> dict[str, str]:
    value = f'Bearer realm="{REALM}"'
    if error is not None:
        value += f', error="{error}"'
    return {"WWW-Authenticate": value}


QUERY_TOKEN = b"access_token"
# The one route a browser's EventSource reads, and so the one place a key may ride in the query.
EVENTS_PATH = re.compile(r"^/jobs/[^/]+/events$")


def _take_query_tokens(scope: Scope) -> list[bytes]:
    """Remove ``access_token`` from the scope's query string (in place); its values.

    Matched by its decoded name, as the app would read it (``access%5Ftoken`` is the same
    parameter), and cut from every request, whether it is honoured or not, so that neither
    the app nor the access log ever sees a key in a query.
    """
    query: bytes = scope.get("query_string", b"")
    if QUERY_TOKEN not in query.lower() and b"%" not in query:
        return []
    kept, tokens = [], []
    for pair in query.split(b"&"):
        name, _, value = pair.partition(b"=")
        if unquote_to_bytes(name.replace(b"+", b" ")) == QUERY_TOKEN:
            tokens.append(unquote_to_bytes(value.replace(b"+", b" ")))
        else:
            kept.append(pair)
    # Mutated, not replaced: uvicorn logs the request from this very scope.
    scope["query_string"] = b"&".join(kept)
    return tokens


def request_token(scope: Scope) -> bytes | None:
    """The key a request presents: its bearer header, or on ``GET``/``HEAD /jobs/{id}/events``
    only, its ``access_token`` query parameter. A request that presents more than one (headers,
    parameters, or both ways: RFC 6750, section 2) gets 400: which one counted was a matter of
    position (the first header, the last parameter)."""
    query_tokens = [token for token in _take_query_tokens(scope) if token]
    if scope.get("method") not in ("GET", "HEAD") or not EVENTS_PATH.match(app_path(scope)):
        query_tokens = []  # taken out of the query, and no key there
    bearers = [bearer_token(v) for k, v in scope.get("headers", ()) if k == b"authorization"]
    headers = [token for token in bearers if token is not None]  # a proxy's Basic is no key
    if len(headers) + len(query_tokens) > 1:
        raise BadRequest(
            "the request presents more than one key (Authorization headers or access_token "
            "parameters): send one",
            headers=_challenge("invalid_request"),
        )
    if headers:
        return headers[0]
    return query_tokens[0] if query_tokens else None


def check(keys: KeyRing, needed: Access, token: bytes | None) -> ServiceError | None:
    """Why a request presenting ``token`` may not have ``needed``, or None."""
    if needed is Access.PUBLIC:
        return None
    if token is None:
        return Unauthorized(
            "this endpoint needs an API key: send 'Authorization: Bearer <key>'",
            headers=_challenge(),
        )
    granted = keys.grant(token)
    if granted is None:
        return Unauthorized("the API key is not valid", headers=_challenge("invalid_token"))
    if granted < needed:
        return Forbidden(
            "the read-only API key may read and predict, but not start, cancel or change anything",
            headers=_challenge("insufficient_scope"),
        )
    return None


def app_path(scope: Scope) -> str:
    """The request's path inside the app (without the ``root_path`` it is mounted under)."""
    path: str = scope.get("path", "/")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path


class ApiKeyMiddleware:
    """Refuses requests without the key their method and path need (401, or 403 read-only).

    With no ``keys`` (an open API) it refuses nothing, but still cuts ``access_token`` out of
    every query: a browser that kept a key from another deployment sends it, and it got 422
    as an unknown parameter on every route, and was written to the access log."""

    def __init__(self, app: ASGIApp, *, keys: KeyRing | None, docs_public: bool) -> None:
        self.app = app
        self.keys = keys
        self.docs_public = docs_public

    def refusal(self, scope: Scope) -> ServiceError | None:
        """Why this request may not pass (None: it may). Takes any ``access_token`` out of the
        query (:func:`request_token`)."""
        if self.keys is None:
            _take_query_tokens(scope)
            return None
        needed = required_access(
            scope.get("method", "GET"), app_path(scope), docs_public=self.docs_public
        )
        try:
            token = request_token(scope)
        except BadRequest as ambiguous:  # no key is read: none is needed on a public path
            return None if needed is Access.PUBLIC else ambiguous
        return check(self.keys, needed, token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check, then pass the request on untouched."""
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        refusal = self.refusal(scope)
        if refusal is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # policy violation
        else:
            await send_error(send, refusal)


def keys_from(settings: Settings) -> KeyRing | None:
    """The key ring the settings describe; None when the API is open."""
    if settings.api_key is None:
        return None
    readonly = settings.readonly_api_key
    return KeyRing(
        settings.api_key.get_secret_value(),
        readonly.get_secret_value() if readonly is not None else None,
    )


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def exposure_problem(settings: Settings) -> str | None:
    """Why the API must not start with these settings, or None.

    An API without a key on an address other machines reach lets anyone start jobs on the
    GPUs and read every model, so it needs an explicit ``MNIST_ALLOW_NO_AUTH=true``.
    """
    if settings.api_key is not None or settings.allow_no_auth or is_loopback(settings.host):
        return None
    return (
        f"refusing to serve the API on {settings.host} without an API key: anyone who can reach "
        "that address could start training jobs and read every model.\n"
        "  Set a key:   export MNIST_API_KEY=\"$(python -c 'import secrets; "
        "print(secrets.token_urlsafe(32))')\"\n"
        "               (clients then send 'Authorization: Bearer <key>'; "
        "MNIST_READONLY_API_KEY adds a key that can only read and predict)\n"
        "  or listen on this machine only:   export MNIST_HOST=127.0.0.1\n"
        "  or, behind a proxy that authenticates for you, opt out on purpose:   "
        "export MNIST_ALLOW_NO_AUTH=true"
    )
