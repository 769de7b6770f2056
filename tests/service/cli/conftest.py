"""A stand-in HTTP server for the CLI's tests: pages as long as a pipe needs, and the answers
of servers that are not the MNIST service."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

JOB_ID = "0192a3b4c5d6e7f8091a2b3c4d5e6f70"
MANY_JOBS = 2000  # a table far longer than a pipe's buffer (64 KiB)
MANY_STEPS = 5000
LONG_JOB_ID = "0192a3b4c5d6e7f8091a2b3c4d5e6f71"  # a job of LONG_STEPS steps (a CSV of 0.75 MB)
LONG_STEPS = 20_000
HTML_404 = (
    "<!DOCTYPE html><html><head><title>404 Not Found</title></head><body>"
    "<h1>Not Found</h1><p>The requested URL was not found on this server.</p>"
    + "<!-- padding -->" * 200
    + "</body></html>"
)
HTML_PAGE = "<html><head><title>\n  Welcome to nginx!\n</title></head><body>hello</body></html>"


def stub_job(i: int) -> dict[str, object]:
    return {
        "id": f"{i:032x}",
        "status": "succeeded",
        "params": {"epochs": 3},
        "created_at": "2026-01-01T00:00:00+00:00",
        "epoch": 3,
        "step": 471,
        "total_steps": 471,
        "accuracy": 0.9,
        "device": "cpu",
    }


class StubHandler(BaseHTTPRequestHandler):
    """GET /jobs and /jobs/ID/metrics as the service answers them; under /html/ an HTML 404
    page, /page/ an HTML 200 page, /json/ another JSON API's 404."""

    def _send(self, status: int, content_type: str, body: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path.startswith("/html/"):
            self._send(404, "text/html; charset=utf-8", HTML_404)
        elif path.startswith("/page/"):
            self._send(200, "text/html", HTML_PAGE)
        elif path.startswith("/json/"):
            self._send(404, "application/json", json.dumps({"detail": "Not Found"}))
        elif path == "/odd/jobs":  # the service's shape, a value it never sends
            jobs = [{**stub_job(0), "created_at": "yesterday"}]
            self._send(200, "application/json", json.dumps({"jobs": jobs, "next": None}))
        elif path == "/jobs":
            jobs = [stub_job(i) for i in range(MANY_JOBS)]
            self._send(200, "application/json", json.dumps({"jobs": jobs, "next": None}))
        elif path == f"/jobs/{JOB_ID}/metrics":
            steps = [
                {"step": s, "epoch": 1, "loss": 1.0 / s, "examples_seen": 64 * s}
                for s in range(1, MANY_STEPS + 1)
            ]
            body = {"job_id": JOB_ID, "status": "succeeded", "steps": steps, "epochs": []}
            self._send(200, "application/json", json.dumps({**body, "next_after_step": 0}))
        elif path in (f"/jobs/{JOB_ID}/metrics.csv", f"/jobs/{LONG_JOB_ID}/metrics.csv"):
            count = MANY_STEPS if path.startswith(f"/jobs/{JOB_ID}") else LONG_STEPS
            rows = (f"{s},1,{64 * s},{1.0 / s!r}," for s in range(1, count + 1))
            header = "step,epoch,examples_seen,loss,test_accuracy"
            self._send(200, "text/csv; charset=utf-8", "\n".join([header, *rows]) + "\n")
        else:
            self._send(404, "text/plain", "nothing here")

    def do_POST(self) -> None:
        """Under /any/, 200 with JSON that is no job, as a server answering everything."""
        self._anything()

    def do_DELETE(self) -> None:
        """The same for DELETE."""
        self._anything()

    def _anything(self) -> None:
        if urlsplit(self.path).path.startswith("/any/"):
            self._send(200, "application/json", json.dumps({"id": None, "status": "x"}))
        else:
            self._send(404, "text/plain", "nothing here")

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the tests read the CLI's output, not the server's."""


@pytest.fixture
def db_url(sqlite_url: str) -> str:
    """The CLI works the same on every backend: SQLite only."""
    return sqlite_url


@pytest.fixture
def stub_url() -> Iterator[str]:
    """The stand-in server's address, serving from a thread until the test ends."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# A job as the API reads it while it runs: what a watch starts from.
RUNNING_JOB = {
    "id": JOB_ID,
    "status": "running",
    "attempt": 1,
    "max_attempts": 3,
    "step": 0,
    "epoch": 0,
    "params": {"epochs": 1},
    "steps_per_epoch": 2,
    "started_at": "2026-01-01T00:00:00+00:00",
    "finished_at": None,
    "accuracy": None,
    "error": None,
}
