"""A client of the service's HTTP API (what the CLI uses): errors as :class:`ApiError`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx

from service import sse

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "MNIST_URL"
API_KEY_ENV = "MNIST_API_KEY"
TIMEOUT_S = 30.0
STREAM_READ_TIMEOUT_S = 60.0  # the server sends a keep-alive every 15 s
RECONNECTS = 5  # a dropped event stream is resumed this many times in a row
RECONNECT_DELAY_S = 1.0
METRICS_PAGE = 10_000


class ApiError(Exception):
    """The API answered with an error, or could not be reached (status 0)."""

    def __init__(
        self, status: int, code: str, message: str, details: list[dict[str, Any]] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or []


def _raise_for_error(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        error = response.json()["error"]
        raise ApiError(response.status_code, error["code"], error["message"], error.get("details"))
    except (ValueError, KeyError, TypeError):
        raise ApiError(
            response.status_code, f"http_{response.status_code}", response.text[:200]
        ) from None


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

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ApiError(0, "unreachable", f"cannot reach the API at {self.url}: {exc}") from exc
        _raise_for_error(response)
        return response.json()

    def submit(self, params: dict[str, Any]) -> dict[str, Any]:
        """Queue a job; ``params`` holds only the fields to set."""
        job: dict[str, Any] = self._request("POST", "/jobs", json=params)
        return job

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

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a job."""
        job: dict[str, Any] = self._request("POST", f"/jobs/{job_id}/cancel")
        return job

    def metrics(self, job_id: str) -> dict[str, Any]:
        """Every step and epoch of a job (all pages), with its status."""
        steps: list[dict[str, Any]] = []
        after = 0
        while True:
            params = {"after_step": after, "limit": METRICS_PAGE}
            page = self._request("GET", f"/jobs/{job_id}/metrics", params=params)
            steps.extend(page["steps"])
            if len(page["steps"]) < METRICS_PAGE:
                return {**page, "steps": steps}
            after = page["next_after_step"]

    def predict(self, image: bytes, filename: str, *, job_id: str | None = None) -> dict[str, Any]:
        """The digit in an image; ``job_id`` picks the model (default: the latest)."""
        params = {"job_id": job_id} if job_id else {}
        answer: dict[str, Any] = self._request(
            "POST", "/predict", params=params, files={"file": (filename, image)}
        )
        return answer

    def events(self, job_id: str) -> Iterator[sse.Event]:
        """A job's events until its final status; a dropped stream is resumed where it was."""
        last_id: str | None = None
        failures = 0
        timeout = httpx.Timeout(TIMEOUT_S, read=STREAM_READ_TIMEOUT_S)
        while True:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            problem = "the stream ended before the job did"
            try:
                with self._http.stream(
                    "GET", f"/jobs/{job_id}/events", headers=headers, timeout=timeout
                ) as response:
                    if not response.is_success:
                        response.read()
                        _raise_for_error(response)
                    for event in sse.parse(response.iter_lines()):
                        failures = 0
                        last_id = event.id
                        yield event
                        if event.event == "status" and event.json().get("final"):
                            return
            except (httpx.TransportError, httpx.StreamError) as exc:
                problem = str(exc) or type(exc).__name__
            failures += 1
            if failures > RECONNECTS:
                raise ApiError(0, "unreachable", f"lost the events of job {job_id}: {problem}")
            time.sleep(RECONNECT_DELAY_S)
