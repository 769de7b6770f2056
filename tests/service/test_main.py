"""``python -m service`` as the production command runs it: several server processes."""

from __future__ import annotations

from pathlib import Path

from tests.support import api_server, service_env


def test_the_api_serves_from_several_processes(sqlite_url: str, tmp_path: Path) -> None:
    env = service_env(
        database_url=sqlite_url,
        checkpoint_dir=str(tmp_path / "models"),
        api_workers="2",
        access_log="false",
    )
    log = tmp_path / "api.log"
    with api_server(env, log) as client:
        created = client.post("/jobs", json={"seed": 1})
        assert created.status_code == 202
        # Any process answers: they share the database, not memory.
        for _ in range(4):
            assert client.get(created.headers["location"]).json()["id"] == created.json()["id"]
    text = log.read_text()
    assert text.count("Started server process") >= 2, text
    assert "GET /jobs/" not in text  # no access log
