"""Domain errors: each carries its HTTP status, and one handler turns them into one envelope."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base of every error a client can cause or should see; ``status_code`` is the HTTP status.

    ``retry_after_s`` says when the client may try again: a class's default (a state the
    service expects to leave) or one error's own (a limit that frees up at its own pace). It
    is the one way an error carries ``Retry-After``: the header is written here, from it, for
    every response the error becomes.
    """

    status_code = 500
    code = "internal_error"
    retry_after_s: int | None = None

    def __init__(
        self,
        message: str,
        details: list[dict[str, Any]] | None = None,
        *,
        headers: dict[str, str] | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        if retry_after_s is not None:
            self.retry_after_s = retry_after_s
        retry = {} if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}
        self.headers = {**(headers or {}), **retry}

    def envelope(self) -> dict[str, Any]:
        """The JSON body sent to the client."""
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            body["details"] = self.details
        return {"error": body}


class BadRequest(ServiceError):
    """The request cannot be read at all (e.g. a malformed multipart body)."""

    status_code = 400
    code = "bad_request"


class Unauthorized(ServiceError):
    """No API key, or not one the server knows; ``headers`` carries ``WWW-Authenticate``."""

    status_code = 401
    code = "unauthorized"


class Forbidden(ServiceError):
    """A valid key that may not do this (the read-only key starting or cancelling a job)."""

    status_code = 403
    code = "forbidden"


class NotFound(ServiceError):
    """The resource does not exist."""

    status_code = 404
    code = "not_found"


class Conflict(ServiceError):
    """The request does not fit the resource's current state."""

    status_code = 409
    code = "conflict"


class InvalidInput(ServiceError):
    """The request is well-formed HTTP but its content is unusable."""

    status_code = 422
    code = "invalid_input"


class PayloadTooLarge(ServiceError):
    """The request body is larger than the service accepts."""

    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(ServiceError):
    """The request body is of a kind the service does not read."""

    status_code = 415
    code = "unsupported_media_type"


class TooManyRequests(ServiceError):
    """The server is at a limit for now; give ``retry_after_s``."""

    status_code = 429
    code = "too_many_requests"


class RequestTimeout(ServiceError):
    """The client took too long to send its headers or its body; the connection is closed."""

    status_code = 408
    code = "request_timeout"


class UriTooLong(ServiceError):
    """The request target is longer than the server reads."""

    status_code = 414
    code = "uri_too_long"


class HeaderTooLarge(ServiceError):
    """The request line and headers are larger than the server reads."""

    status_code = 431
    code = "header_too_large"


class NotImplementedHere(ServiceError):
    """The request asks for what this server does not do: a method it does not know, or a
    transfer coding other than chunked (RFC 9110, section 15.6.2)."""

    status_code = 501
    code = "not_implemented"


class VersionNotSupported(ServiceError):
    """The request's HTTP version is not served (RFC 9110, section 15.6.6)."""

    status_code = 505
    code = "version_not_supported"


class AtCapacity(ServiceError):
    """The server holds as many connections or streams as it accepts; give ``retry_after_s``."""

    status_code = 503
    code = "at_capacity"


class LeaseLost(Exception):
    """A worker's write was refused: another attempt (or a cancel) now owns the job."""


class CancelRequested(Exception):
    """The job was cancelled while its worker trained it."""


# Retry-After of every 503 that says "not now": a database outage, a readiness check that
# failed. Short, because a blip is over in seconds; long enough that a crowd of clients
# retrying meanwhile costs the server little (each refusal is a failed connection attempt).
RETRY_AFTER_S = 2


class NotReady(ServiceError):
    """The service cannot do its work yet (database, schema or workers missing).

    Always carries ``Retry-After``: it is a state the service expects to leave.
    """

    status_code = 503
    code = "not_ready"
    retry_after_s = RETRY_AFTER_S


class DatabaseUnavailable(NotReady):
    """The database cannot be reached or written to right now (down, restarting, refusing
    connections, read-only, disk full). Not the client's fault and not a bug: 503, try again."""

    code = "database_unavailable"

    def __init__(
        self, message: str = "the database is unavailable right now; try again shortly"
    ) -> None:
        super().__init__(message)


class StorageFull(DatabaseUnavailable):
    """The database's disk is full (SQLite's FULL, PostgreSQL's 53100): writes fail until
    space is freed, reads still answer. Its own answer, 507 Insufficient Storage with
    ``Retry-After``, rather than the blip's 503: it lasts until someone acts, and the client
    and the operator should know which. Workers treat it as any outage and retry
    (:func:`service.store.outage.is_outage`): their jobs wait, none fails for it."""

    status_code = 507
    code = "storage_full"
    retry_after_s = 30

    # It told clients to delete ended jobs, which is a write too (507 again on SQLite) and frees
    # none of the disk (deleted rows' pages are reused, the file does not shrink): only room
    # made on the disk by whoever runs the service brings writes back.
    def __init__(
        self,
        message: str = "the database's storage is full: nothing can be written until the "
        "service's operator frees space on the database's disk; retry later",
    ) -> None:
        super().__init__(message)
