"""A key in the query, on a real uvicorn: taken on the event stream only, never logged."""

from __future__ import annotations

import shutil
from pathlib import Path

from service import sse
from tests.support import api_process, service_env

KEY = "query-token-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


def test_access_token_is_taken_on_the_event_stream_only_and_never_logged(
    sqlite_template: Path, tmp_path: Path
) -> None:
    shutil.copy(sqlite_template, tmp_path / "mnist.db")
    env = service_env(
        database_url=f"sqlite:///{tmp_path / 'mnist.db'}",
        checkpoint_dir=str(tmp_path / "models"),
        api_key=KEY,
    )
    log = tmp_path / "api.log"
    with api_process(env, log) as (_proc, client):
        job_id = client.post("/jobs", json={}, headers=AUTH).json()["id"]
        assert client.post(f"/jobs/{job_id}/cancel", headers=AUTH).status_code == 200
        # The checkpoint (or any other GET) does not take a key from its query, however the
        # name is spelt and whatever the client says it accepts.
        download = f"/models/{job_id}/checkpoint"
        assert client.get(download, headers=AUTH).status_code == 404  # the key works: no model
        for name in ("access_token", "access%5Ftoken"):
            refused = client.get(
                f"{download}?{name}={KEY}", headers={"Accept": "text/event-stream"}
            )
            assert refused.status_code == 401, name
            assert refused.json()["error"]["code"] == "unauthorized"
        # The event stream does, under its plain and its encoded name.
        for name in ("access_token", "access%5Ftoken"):
            url = f"/jobs/{job_id}/events?{name}={KEY}"
            with client.stream("GET", url, headers={"Accept": "text/event-stream"}) as response:
                assert response.status_code == 200, name
                events = list(sse.parse(response.iter_lines()))
            assert events[-1].json()["status"] == "cancelled"
            assert client.get(url.replace(KEY, "wrong-key-" + "x" * 20)).status_code == 401
    logged = log.read_text()
    assert f"/jobs/{job_id}/events" in logged and download in logged  # the lines are there
    assert KEY not in logged and "token" not in logged, logged[-3000:]
