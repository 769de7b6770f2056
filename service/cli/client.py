"""A client of the service's HTTP API (what the CLI uses): errors as :class:`ApiError`."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import httpx

from service import sse
from service.backoff import capped_exponential
from service.cli.deadline import DeadlinePassed, deadline
from service.clock import is_job_id

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "MNIST_URL"
API_KEY_ENV = "MNIST_API_KEY"
TIMEOUT_S = 30.0  # each connect, read and write of a call
# A call's whole answer, however slowly its bytes come: TIMEOUT_S bounds each read, and a
# server that sent a byte every few seconds held a call for good. Not a stream's (it lasts).
DEADLINE_S = 120.0
STREAM_READ_TIMEOUT_S = 60.0  # the server sends a keep-alive every 15 s
PATIENCE_S = 60.0  # how long a watch waits out an API that is away (a restart takes seconds)
RETRY_FIRST_S = 0.5  # the first pause before trying again; each next one doubles ...
RETRY_MAX_S = 5.0  # ... up to this
METRICS_PAGE = 10_000
PROXY_STATUSES = (502, 504)  # a proxy's bad gateway and gateway timeout: the API behind it
PASSING_STATUSES = (0, 503, *PROXY_STATUSES)  # unreachable; busy; the API behind a proxy away
TITLE_CHARS = 80  # of an HTML page's <title>, quoted when another server answers
NOT_THE_API = "this is not the MNIST service's API"
_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)


class ApiError(Exception):
    """The API answered with an error, or could not be reached (status 0)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: list[dict[str, Any]] | None = None,
        *,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or []
        self.retry_after_s = retry_after_s  # a 503's Retry-After: when to ask again

    @property
    def passing(self) -> bool:
        """Whether asking again later may succeed: the API could not be reached (restarting),
        answered 503 (busy, or its database away), or a proxy in front of it answered 502 or
        504 (the API behind it restarting or stalled): states the service expects to leave."""
        return self.status in PASSING_STATUSES


class Patience:
    """The one retry policy of the watches (a job's events, a sweep's polls): they wait out an
    API that is away, with growing pauses (or a 503's ``Retry-After``), for up to ``limit_s``
    since it last answered. ``mnist-service run`` restarts a dead API within seconds, and the
    jobs train on meanwhile: a watch that gave up at the first refused connection gave up on a
    job that then succeeded."""

    def __init__(
        self,
        limit_s: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.limit_s = PATIENCE_S if limit_s is None else limit_s
        self._clock, self._sleep = clock, sleep
        self._since: float | None = None  # when the API stopped answering
        self._tries = 0  # pauses since it last answered

    def answered(self) -> None:
        """The API answered: the next outage gets the whole patience again."""
        self._since, self._tries = None, 0

    def wait_out(self, exc: ApiError, what: str, see: str) -> None:
        """Pause before asking again after ``exc``; re-raise it if it will not pass, or give up
        once the API has been away for ``limit_s``, saying that ``what`` goes on on the server
        and where to ``see`` it."""
        if not exc.passing:
            raise exc
        now = self._clock()
        if self._since is None:
            self._since = now
        left = self._since + self.limit_s - now
        if left <= 0:
            raise ApiError(
                exc.status,
                "unreachable",
                f"gave up watching {what} after {self.limit_s:g} s without the API "
                f"({exc.message}); {what} goes on on the server: see {see}",
            ) from exc
        backoff = capped_exponential(RETRY_FIRST_S, RETRY_MAX_S, self._tries)
        pause = exc.retry_after_s if exc.retry_after_s is not None else backoff
        self._tries += 1
        self._sleep(max(0.0, min(pause, left)))


def _retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds (the service sends seconds; an HTTP date is not read)."""
    value = response.headers.get("retry-after", "").strip()
    return float(value) if value.isdigit() else None


def _title(html: str) -> str | None:
    match = _TITLE.search(html)
    return " ".join(match.group(1).split())[:TITLE_CHARS] if match else None


def _where(request: httpx.Request) -> str:
    """The URL asked, without its query: enough to see which server and path answered."""
    return str(request.url.copy_with(query=None))


def _summary(response: httpx.Response) -> str:
    """One line about an answer that is not the service's: its status and what it carried,
    never the page itself (an HTML error page would fill the terminal)."""
    status = f"{response.status_code} {response.reason_phrase}".rstrip()
    kind = response.headers.get("content-type", "no content type").split(";")[0].strip()
    what = [kind, f"{len(response.content)} bytes"]
    if kind == "text/html" and (title := _title(response.text)):
        what.append(f"titled {title!r}")
    return f"{_where(response.request)} answered {status} ({', '.join(what)})"


def _envelope(response: httpx.Response) -> dict[str, Any] | None:
    """The service's error envelope ``{"error": {"code", "message", ...}}``, if that is what
    the answer holds."""
    try:
        error = response.json()["error"]
        if isinstance(error["code"], str) and isinstance(error["message"], str):
            return dict(error)
    except (ValueError, KeyError, TypeError):
        pass
    return None


def _raise_for_error(response: httpx.Response, base: str, path: str) -> None:
    """An :class:`ApiError` for an error answer, saying what was found when the server is not
    the service (another server, or a wrong path in ``--url``)."""
    if response.is_success:
        return
    status, request = response.status_code, response.request
    error = _envelope(response)
    if error is None:
        # A proxy's 502/504 speaks for the API behind it (restarting, stalled); any other
        # answer without the service's envelope came from another server.
        said = "the API behind it did not answer" if status in PROXY_STATUSES else NOT_THE_API
        raise ApiError(
            status,
            f"http_{status}",
            f"{_summary(response)}: {said}",
            retry_after_s=_retry_after(response),
        )
    # The service's own answer for a path or method it has no route for: FastAPI's 404/405
    # (code http_404/http_405), not a resource's "no job with id ...".
    if status == 404 and error["code"] == "http_404":
        message = (
            f"{_where(request)} answered 404 Not Found: {base} is not the MNIST service's API "
            f"(it has no {path}); check --url or ${URL_ENV}"
        )
        raise ApiError(status, error["code"], message)
    if status == 405 and error["code"] == "http_405":
        message = (
            f"{request.method} {_where(request)} answered 405 Method Not Allowed: "
            f"the API at {base} does not offer this (an older version?)"
        )
        raise ApiError(status, error["code"], message)
    raise ApiError(
        status,
        error["code"],
        error["message"],
        error.get("details"),
        retry_after_s=_retry_after(response),
    )


def _not_the_api(response: httpx.Response) -> ApiError:
    """A successful answer in a form the service never sends: another server answered."""
    return ApiError(
        response.status_code,
        "not_the_api",
        f"{_summary(response)}: {NOT_THE_API}",
    )


def _media_type(response: httpx.Response) -> str:
    return str(response.headers.get("content-type", "")).split(";")[0].strip()


def _json(response: httpx.Response) -> Any:
    """A successful answer's JSON; a page that is not JSON means another server answered."""
    if _media_type(response) == "application/json":
        try:
            return response.json()
        except ValueError:
            pass
    raise _not_the_api(response)


def _csv(response: httpx.Response) -> str:
    """A successful CSV answer's text; anything else means another server answered."""
    if _media_type(response) == "text/csv":
        return response.text
    raise _not_the_api(response)


class Client:
    """Jobs, metrics, events and predictions over HTTP."""

    def __init__(
        self, url: str, *, api_key: str | None = None, http: httpx.Client | None = None
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = http or httpx.Client(base_url=self.url, timeout=TIMEOUT_S)
        self._http.headers.update(headers)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def _request(
        self,
        method: str,
        path: str,
        *,
        parse: Callable[[httpx.Response], Any] = _json,
        **kwargs: Any,
    ) -> Any:
        try:
            with deadline(DEADLINE_S):
                response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ApiError(0, "unreachable", f"cannot reach the API at {self.url}: {exc}") from exc
        except DeadlinePassed:
            reason = f"the API at {self.url} took over {DEADLINE_S:g} s to answer"
            raise ApiError(0, "unreachable", reason) from None
        _raise_for_error(response, self.url, path)
        if response.status_code == 204:  # done, nothing to say (DELETE)
            return None
        return parse(response)

    def submit(self, params: dict[str, Any]) -> dict[str, Any]:
        """Queue a job; ``params`` holds only the fields to set."""
        return _a_job(self._request("POST", "/jobs", json=params))

    def job(self, job_id: str) -> dict[str, Any]:
        """One job."""
        job: dict[str, Any] = self._request("GET", f"/jobs/{job_id}")
        return job

    def jobs(self, *, status: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        """The newest jobs, newest first."""
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        page = self._request("GET", "/jobs", params=params)
        jobs: list[dict[str, Any]] = page["jobs"]
        return jobs

    def create_sweep(self, body: dict[str, Any]) -> dict[str, Any]:
        """Queue a sweep (the body of ``POST /sweeps``)."""
        sweep: dict[str, Any] = self._request("POST", "/sweeps", json=body)
        return sweep

    def sweep(self, sweep_id: str) -> dict[str, Any]:
        """One sweep with its trials."""
        sweep: dict[str, Any] = self._request("GET", f"/sweeps/{sweep_id}")
        return sweep

    def sweeps(self, *, limit: int = 20) -> list[dict[str, Any]]:
        """The newest sweeps, newest first."""
        page = self._request("GET", "/sweeps", params={"limit": limit})
        sweeps: list[dict[str, Any]] = page["sweeps"]
        return sweeps

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a job."""
        return _a_job(self._request("POST", f"/jobs/{job_id}/cancel"), job_id)

    def cancel_sweep(self, sweep_id: str) -> dict[str, Any]:
        """Cancel a sweep: its queued trials now, its running ones at their next flush."""
        sweep: dict[str, Any] = self._request("POST", f"/sweeps/{sweep_id}/cancel")
        return sweep

    def delete(self, job_id: str, *, sweep: bool = False) -> None:
        """Delete a job that has ended, with its metrics and checkpoint, or a sweep with all
        its trials (204, no body)."""
        path = f"/sweeps/{job_id}" if sweep else f"/jobs/{job_id}"
        if self._request("DELETE", path) is not None:
            raise ValueError("a body where the service answers 204")

    def metrics(self, job_id: str) -> dict[str, Any]:
        """Every step and epoch of a job (all pages, of one run), with its status."""
        steps: list[dict[str, Any]] = []
        after, attempt = 0, None
        while True:
            params = {"after_step": after, "limit": METRICS_PAGE}
            page = self._request("GET", f"/jobs/{job_id}/metrics", params=params)
            if attempt is not None and page.get("attempt") != attempt:  # a retry: start over
                steps, after, attempt = [], 0, None
                continue
            attempt = page.get("attempt")
            steps.extend(page["steps"])
            if len(page["steps"]) < METRICS_PAGE:
                return {**page, "steps": steps}
            after = page["next_after_step"]

    def metrics_csv(self, job_id: str) -> str:
        """Every step as the API's CSV (the one place its columns are made)."""
        text: str = self._request("GET", f"/jobs/{job_id}/metrics.csv", parse=_csv)
        return text

    def predict(
        self,
        images: Sequence[tuple[str, bytes]],
        *,
        job_id: str | None = None,
        model: str | None = None,
    ) -> dict[str, Any]:
        """The digit in each image (``(filename, bytes)``): one image goes as the multipart
        ``file`` and the answer is a prediction; several go as ``files`` and the answer holds
        one prediction each. ``job_id`` or the alias ``model`` picks the model; with neither
        the API picks (the ``production`` alias, else the latest succeeded job)."""
        params = {name: value for name, value in (("job_id", job_id), ("model", model)) if value}
        field = "file" if len(images) == 1 else "files"
        files = [(field, (name, data)) for name, data in images]
        answer: dict[str, Any] = self._request("POST", "/predict", params=params, files=files)
        return answer

    def events(self, job_id: str) -> Iterator[sse.Event]:
        """A job's events until its final status; a dropped stream is resumed where it was,
        through an API restart or a busy 503 (:class:`Patience`)."""
        last_id: str | None = None
        patience = Patience()
        path = f"/jobs/{job_id}/events"
        # (connect, read, write, pool) as a tuple: an httpx.Timeout is refused by httpx2's
        # clients (Starlette's TestClient, from 1.10 on), a tuple is taken by both.
        timeout = (TIMEOUT_S, STREAM_READ_TIMEOUT_S, TIMEOUT_S, TIMEOUT_S)
        while True:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            problem = ApiError(0, "unreachable", "the stream ended before the job did")
            try:
                with self._http.stream("GET", path, headers=headers, timeout=timeout) as response:
                    if not response.is_success:
                        response.read()
                        _raise_for_error(response, self.url, path)
                    if response.status_code == 204:
                        # The SSE standard's "stop reconnecting": the stream had ended (its
                        # final status was lost with the connection). The job says how.
                        final = {**self.job(job_id), "final": True}
                        yield sse.Event("status", json.dumps(final), last_id)
                        return
                    for event in sse.parse(response.iter_lines()):
                        patience.answered()
                        last_id = event.id
                        yield event
                        if event.event == "status" and event.json().get("final"):
                            return
            except (httpx.TransportError, httpx.StreamError) as exc:
                reason = f"cannot reach the API at {self.url}: {str(exc) or type(exc).__name__}"
                problem = ApiError(0, "unreachable", reason)
            except ApiError as exc:
                problem = exc
            patience.wait_out(problem, f"job {job_id}", f"mnist-service metrics {job_id}")


def _a_job(answer: Any, job_id: str | None = None) -> dict[str, Any]:
    """``answer`` as the service sends a job: its id one (``job_id``, when given), else a
    ValueError (another server at the URL answered; the caller says so): a server answering
    200 with any JSON had ``cancel`` and ``submit`` report success for no job."""
    found = answer["id"]
    if not is_job_id(found):
        raise ValueError("no job id")
    if job_id is not None and found != job_id:
        raise ValueError("another job's id")
    job: dict[str, Any] = answer
    return job
