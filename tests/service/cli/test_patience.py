"""The watches (``submit --watch``, ``sweep --watch``) wait out an API that is away: a restart
under ``mnist-service run`` (connections refused for seconds), a proxy's 502 or 504 while the API
behind it is away, a busy 503 with Retry-After; and give up after :data:`PATIENCE_S`, saying the
job goes on."""

from __future__ import annotations

import io
import json
import signal
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from service.cli import client as client_module
from service.cli import commands as cli
from service.cli.client import ApiError, Client, Patience
from service.cli.sweeps import watch_sweep
from tests.service.cli.conftest import JOB_ID, RUNNING_JOB
from tests.service.cli.test_client import run_against
from tests.support import FakeClock, free_port, local_env, process, wait_for


def stream(*events: tuple[str, str, dict[str, Any]]) -> httpx.Response:
    body = "".join(f"id: {i}\nevent: {e}\ndata: {json.dumps(d)}\n\n" for i, e, d in events)
    return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})


def test_a_job_watch_waits_out_a_restart_a_proxy_and_a_busy_503_and_resumes_where_it_was(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeClock()
    monkeypatch.setattr(client_module, "Patience", partial(Patience, clock=fake, sleep=fake.sleep))
    refusals = 10  # ~38 s of a restarting API: more than a handful of tries
    opened: list[str | None] = []

    def answer(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(202, json=RUNNING_JOB)
        opened.append(request.headers.get("last-event-id"))
        if len(opened) == 1:  # a status, then the API dies
            return stream(("1:0:0", "status", RUNNING_JOB))
        if len(opened) <= 1 + refusals:
            raise httpx.ConnectError("Connection refused", request=request)
        if len(opened) == 2 + refusals:  # a proxy in front: the API behind it still away
            page = "<html><head><title>502 Bad Gateway</title></head></html>"
            return httpx.Response(502, text=page, headers={"content-type": "text/html"})
        if len(opened) == 3 + refusals:  # ... or stalled
            return httpx.Response(504, text="upstream timed out")
        if len(opened) == 4 + refusals:  # back, but its event streams are all taken
            error = {"error": {"code": "busy", "message": "too many event streams"}}
            return httpx.Response(503, json=error, headers={"Retry-After": "7"})
        final = {**RUNNING_JOB, "status": "succeeded", "accuracy": 0.5, "final": True}
        return stream(("1:2:1", "status", final))

    code, out, err = run_against(httpx.MockTransport(answer), capsys, "submit", "--watch")
    assert code == cli.EXIT_OK, err
    assert out.splitlines()[-1] == f"job {JOB_ID} succeeded: test accuracy 50.00%"
    assert opened[1:] == ["1:0:0"] * (refusals + 4)  # every try resumed where it was
    assert fake.pauses[-1] == 7.0  # the 503's Retry-After
    assert max(fake.pauses[:-1]) == client_module.RETRY_MAX_S  # backing off, within bounds
    assert fake.now < client_module.PATIENCE_S


def test_a_job_watch_gives_up_after_its_patience_saying_the_job_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeClock()
    monkeypatch.setattr(client_module, "Patience", partial(Patience, clock=fake, sleep=fake.sleep))

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("Connection refused", request=request)

    http = httpx.Client(transport=httpx.MockTransport(refuse), base_url="http://stub")
    with pytest.raises(ApiError) as lost:
        list(Client("http://stub", http=http).events(JOB_ID))
    assert fake.now == pytest.approx(client_module.PATIENCE_S)
    assert lost.value.status == 0
    assert lost.value.message == (
        f"gave up watching job {JOB_ID} after 60 s without the API (cannot reach the API at "
        f"http://stub: Connection refused); job {JOB_ID} goes on on the server: "
        f"see mnist-service metrics {JOB_ID}"
    )


def test_a_refusal_that_will_not_pass_is_not_waited_out() -> None:
    fake = FakeClock()
    patience = Patience(clock=fake, sleep=fake.sleep)
    refused = ApiError(404, "not_found", "no sweep")
    with pytest.raises(ApiError) as raised:
        patience.wait_out(refused, "sweep x", "mnist-service sweeps")
    assert raised.value is refused and fake.pauses == []


@pytest.mark.parametrize(
    ("status", "passing", "says"),
    [
        (502, True, "the API behind it did not answer"),
        (504, True, "the API behind it did not answer"),
        (500, False, client_module.NOT_THE_API),
        (404, False, client_module.NOT_THE_API),
    ],
)
def test_a_proxys_bad_gateway_is_waited_out_and_another_servers_error_is_not(
    status: int, passing: bool, says: str
) -> None:
    page = "<html><head><title>Error</title></head></html>"

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, text=page, headers={"content-type": "text/html"})

    http = httpx.Client(transport=httpx.MockTransport(answer), base_url="http://stub")
    with pytest.raises(ApiError) as raised:
        Client("http://stub", http=http).job(JOB_ID)
    assert raised.value.passing is passing
    assert raised.value.message.endswith(f"titled 'Error'): {says}")


class Counted(Patience):
    """Patience that counts the failures it waited out, by what was watched."""

    failures: ClassVar[dict[str, int]] = {}

    def wait_out(self, exc: ApiError, what: str, see: str) -> None:
        Counted.failures[what] = Counted.failures.get(what, 0) + 1
        super().wait_out(exc, what, see)


def in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = call()
        except ApiError as exc:  # the test reads it
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


def test_both_watches_live_through_a_real_api_killed_and_started_again(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `mnist-service run` does when its API dies: the same port answers again seconds
    later. No worker: the job and the sweep wait queued, and are cancelled once it is back."""
    port = free_port()
    env = local_env(db_url, tmp_path / "data", tmp_path, port=str(port), host="127.0.0.1")
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setattr(Counted, "failures", {})
    monkeypatch.setattr(client_module, "Patience", Counted)
    api = httpx.Client(base_url=url, timeout=30)

    def healthy() -> bool:
        try:
            return api.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    with process(["-m", "service"], env, tmp_path / "api-1.log") as first:
        wait_for(healthy, timeout_s=60, what="the API to answer")
        job_id = api.post("/jobs", json={}).json()["id"]
        body = {"params": {"epochs": 1}, "grid": {"seed": [0, 1]}}
        sweep_id = api.post("/sweeps", json=body).json()["id"]
        job_watch, job_result = in_thread(lambda: list(Client(url).events(job_id)))
        sweep_watch, sweep_result = in_thread(
            lambda: watch_sweep(Client(url), sweep_id, io.StringIO(), patience=Counted())
        )
        wait_for(lambda: api.get(f"/jobs/{job_id}").status_code == 200, timeout_s=10, what="job")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    wait_for(
        lambda: {f"job {job_id}", f"sweep {sweep_id}"} <= set(Counted.failures),
        timeout_s=30,
        what="both watches to find the API gone",
    )
    with process(["-m", "service"], env, tmp_path / "api-2.log"):
        wait_for(healthy, timeout_s=60, what="the API to answer again")
        assert api.post(f"/jobs/{job_id}/cancel").status_code == 200
        assert api.post(f"/sweeps/{sweep_id}/cancel").status_code == 200
        job_watch.join(timeout=60)
        sweep_watch.join(timeout=60)
    api.close()
    assert "error" not in job_result and "error" not in sweep_result, (job_result, sweep_result)
    assert job_result["value"][-1].json()["status"] == "cancelled"
    assert sweep_result["value"]["status"] == "cancelled"
