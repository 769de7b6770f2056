"""A full disk under a real SQLite file (a tmpfs filled to its last byte): writes are refused
with 507 ``storage_full`` and reads go on; freeing space brings writes back, no restart."""

from __future__ import annotations

import shutil
from pathlib import Path

from fastapi.testclient import TestClient

from service.api.app import create_app
from tests.conftest import fill_disk
from tests.support import app_settings


def test_a_full_disk_refuses_writes_with_507_and_reads_go_on(
    tiny_disk: Path, sqlite_template: Path, tmp_path: Path
) -> None:
    shutil.copy(sqlite_template, tiny_disk / "mnist.db")
    settings = app_settings(
        f"sqlite:///{tiny_disk / 'mnist.db'}", tmp_path, ready_write_probe_s=0.0
    )
    with TestClient(create_app(settings)) as client:
        job_id = client.post("/jobs", json={}).json()["id"]
        ended = client.post("/jobs", json={}).json()["id"]
        assert client.post(f"/jobs/{ended}/cancel").status_code == 200
        filler = fill_disk(tiny_disk)
        # The write-ahead log may still have room for a few pages it held before.
        answers = [client.post("/jobs", json={}) for _ in range(200)]
        refused = next(a for a in answers if a.status_code != 202)
        assert refused.status_code == 507, refused.text
        assert refused.headers["retry-after"] == "30"
        error = refused.json()["error"]
        assert error["code"] == "storage_full"
        assert "storage is full" in error["message"] and "frees space" in error["message"]
        # It said to delete ended jobs: a write too, refused alike (and it frees no disk).
        assert "DELETE" not in error["message"] and "delete" not in error["message"]
        assert client.delete(f"/jobs/{ended}").status_code == 507
        assert client.get(f"/jobs/{job_id}").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "writes: failing" in ready.json()["error"]["message"]

        filler.unlink()
        assert client.post("/jobs", json={}).status_code == 202
        assert client.get("/readyz").status_code == 200
