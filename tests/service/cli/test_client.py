"""What the CLI says when the URL is not the service's API, and `delete` (against a stand-in
transport: the endpoint is the API's to add)."""

from __future__ import annotations

import json
from typing import cast

import httpx
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.cli import client as client_module
from service.cli import commands as cli
from service.settings import Settings
from tests.service.cli.conftest import HTML_404, HTML_PAGE, JOB_ID, RUNNING_JOB


def test_a_wrong_path_says_what_it_found(
    api_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    url = "http://testserver/xyz"
    with TestClient(create_app(api_settings), base_url=url) as client:
        code = cli.main(["--url", url, "jobs"], http=cast(httpx.Client, client))
    err = capsys.readouterr().err
    assert code == cli.EXIT_API_ERROR
    assert err == (
        f"error: {url}/jobs answered 404 Not Found: {url} is not the MNIST service's API "
        "(it has no /jobs); check --url or $MNIST_URL\n"
    )


@pytest.mark.parametrize(
    ("prefix", "summary"),
    [
        ("/html", f"404 Not Found (text/html, {len(HTML_404)} bytes, titled '404 Not Found')"),
        ("/page", f"200 OK (text/html, {len(HTML_PAGE)} bytes, titled 'Welcome to nginx!')"),
        ("/json", "404 Not Found (application/json, 23 bytes)"),  # {"detail": "Not Found"},
    ],
)
def test_another_servers_answer_is_summed_up_in_one_line(
    stub_url: str, prefix: str, summary: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["--url", stub_url + prefix, "jobs"])
    out, err = capsys.readouterr()
    assert code == cli.EXIT_API_ERROR and out == ""
    assert err == (
        f"error: {stub_url}{prefix}/jobs answered {summary}: this is not the MNIST service's API\n"
    )


def run_against(
    handler: httpx.MockTransport, capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, str, str]:
    with httpx.Client(transport=handler, base_url="http://stub") as http:
        code = cli.main(["--url", "http://stub", "--api-key", "k", *argv], http=http)
    out, err = capsys.readouterr()
    return code, out, err


def envelope(status: int, code: str, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message}})


def test_delete_sends_delete_and_reports_through_the_one_error_path(
    capsys: pytest.CaptureFixture[str],
) -> None:
    seen: list[httpx.Request] = []
    running, missing, old_api = "1" * 32, "2" * 32, "3" * 32

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        job_id = request.url.path.rsplit("/", 1)[-1]
        if job_id == JOB_ID:
            return httpx.Response(204)
        if job_id == running:
            return envelope(409, "conflict", f"job {running} is running: cancel it first")
        if job_id == old_api:
            return envelope(405, "http_405", "Method Not Allowed")
        return envelope(404, "not_found", f"no job with id {job_id}")

    transport = httpx.MockTransport(answer)
    code, out, err = run_against(transport, capsys, "delete", JOB_ID)
    assert (code, out, err) == (cli.EXIT_OK, f"deleted {JOB_ID}\n", "")
    assert seen[0].method == "DELETE" and seen[0].url.path == f"/jobs/{JOB_ID}"
    assert seen[0].headers["authorization"] == "Bearer k"

    code, out, err = run_against(transport, capsys, "delete", running)
    assert (code, out) == (cli.EXIT_API_ERROR, "")
    assert err == f"error: job {running} is running: cancel it first\n"
    code, _, err = run_against(transport, capsys, "delete", missing)
    assert code == cli.EXIT_API_ERROR and err == f"error: no job with id {missing}\n"
    code, _, err = run_against(transport, capsys, "delete", old_api)
    assert code == cli.EXIT_API_ERROR
    assert err == (
        f"error: DELETE http://stub/jobs/{old_api} answered 405 Method Not Allowed: "
        "the API at http://stub does not offer this (an older version?)\n"
    )


def test_a_validation_errors_fields_are_printed_once(capsys: pytest.CaptureFixture[str]) -> None:
    # The API's message already names every field; a detail it does not name is added.
    body = {
        "error": {
            "code": "validation_error",
            "message": "query.job_id: String should match pattern '^[0-9a-f]{32}$'",
            "details": [
                {"loc": ["query", "job_id"], "msg": "String should match pattern '^[0-9a-f]{32}$'"},
                {"loc": ["query", "model"], "msg": "another problem"},
            ],
        }
    }
    transport = httpx.MockTransport(lambda _: httpx.Response(422, content=json.dumps(body)))
    code, _, err = run_against(transport, capsys, "jobs")
    assert code == cli.EXIT_API_ERROR
    assert err.splitlines() == [
        "error: query.job_id: String should match pattern '^[0-9a-f]{32}$'",
        "  query.model: another problem",
    ]


def test_a_watch_whose_final_event_was_lost_ends_on_the_204_of_an_ended_stream(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "RETRY_FIRST_S", 0.0)
    job = RUNNING_JOB
    opened: list[str | None] = []

    def answer(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(202, json=job)
        if request.url.path.endswith("/events"):
            opened.append(request.headers.get("last-event-id"))
            if len(opened) > 1:
                return httpx.Response(204)
            first = f"id: 1:0:0\nevent: status\ndata: {json.dumps(job)}\n\n"
            steps = {"steps": [{"step": 1, "epoch": 1, "loss": 0.5, "examples_seen": 64}]}
            body = first + f"id: 1:1:0\nevent: step\ndata: {json.dumps(steps)}\n\n"
            # The connection ends here, before the final status.
            return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json={**job, "status": "succeeded", "accuracy": 0.5})

    code, out, err = run_against(httpx.MockTransport(answer), capsys, "submit", "--watch")
    assert opened == [None, "1:1:0"]  # resumed once, where it was
    assert code == cli.EXIT_OK, err
    assert out.splitlines()[-1] == f"job {JOB_ID} succeeded: test accuracy 50.00%"


def test_another_apis_json_at_the_same_paths_is_named_not_a_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    transport = httpx.MockTransport(lambda _: httpx.Response(200, json={"items": [], "total": 0}))
    code, out, err = run_against(transport, capsys, "jobs")
    assert (code, out) == (cli.EXIT_API_ERROR, "")
    assert err == (
        "error: http://stub answered JSON the MNIST service does not send (no 'jobs'); "
        "check --url or $MNIST_URL\n"
    )


def test_a_jobs_events_are_read_with_the_streams_own_read_timeout() -> None:
    """The server sends a keep-alive every 15 s: a stream waits longer for a line than a call
    waits for its answer. The timeout is a tuple, which httpx and httpx2 (Starlette's test
    client from 1.10 on) both take."""
    timeouts: list[dict[str, float]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        timeouts.append(request.extensions["timeout"])
        final = {"id": JOB_ID, "status": "succeeded", "final": True}
        body = f"id: 1:0:1\nevent: status\ndata: {json.dumps(final)}\n\n"
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    http = httpx.Client(transport=httpx.MockTransport(answer), base_url="http://testserver")
    events = list(client_module.Client("http://testserver", http=http).events(JOB_ID))
    assert [e.event for e in events] == ["status"]
    assert timeouts == [
        {
            "connect": client_module.TIMEOUT_S,
            "read": client_module.STREAM_READ_TIMEOUT_S,
            "write": client_module.TIMEOUT_S,
            "pool": client_module.TIMEOUT_S,
        }
    ]


def test_metrics_read_across_a_retry_are_the_new_runs_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Paged with after_step, the pages of a run that a retry replaced meanwhile were joined
    to the new run's: the attempt changes, and the reading starts over."""
    monkeypatch.setattr(client_module, "METRICS_PAGE", 2)
    runs = {1: [1.0, 0.9, 0.8], 2: [2.0, 1.5, 1.2]}
    asked: list[int] = []

    def answer(request: httpx.Request) -> httpx.Response:
        after = int(request.url.params["after_step"])
        asked.append(after)
        attempt = 1 if len(asked) == 1 else 2  # the job is retried after the first page
        steps = [
            {"step": n, "epoch": 1, "loss": loss, "examples_seen": 64 * n}
            for n, loss in enumerate(runs[attempt], start=1)
            if n > after
        ][:2]
        body = {"job_id": JOB_ID, "status": "running", "attempt": attempt, "steps": steps}
        next_after = steps[-1]["step"] if steps else after
        return httpx.Response(200, json={**body, "epochs": [], "next_after_step": next_after})

    http = httpx.Client(transport=httpx.MockTransport(answer), base_url="http://testserver")
    page = client_module.Client("http://testserver", http=http).metrics(JOB_ID)
    assert [s["loss"] for s in page["steps"]] == runs[2] and page["attempt"] == 2
    assert asked == [0, 2, 0, 2]
