"""Options checked where they matter: process counts at least 1, and ``--url``/``--api-key``
(or their environment variables) only for the client commands that use them."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.cli import commands as cli
from tests.support import run_python, service_env, stamp_revision


@pytest.mark.parametrize(
    "argv",
    [["run", "--workers", "-5"], ["run", "--workers", "0"], ["worker", "--concurrency", "0"]],
)
def test_a_process_count_below_one_is_a_bad_command_line(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == cli.EXIT_USAGE
    assert (
        f"error: argument {argv[1]}: must be at least 1, not {argv[2]}" in capsys.readouterr().err
    )


def test_a_server_command_ignores_the_clients_url(tmp_path: Path) -> None:
    """MNIST_URL is the clients'; a migrate on a host whose environment sets it for them (to
    ``api:8000``, which no client takes) runs, where a client command is refused as before."""
    env = service_env(database_url=f"sqlite:///{tmp_path / 'm.db'}", url="api:8000")
    migrated = run_python(["-m", "service.cli", "migrate"], env, timeout_s=120)
    assert migrated.returncode == cli.EXIT_OK, migrated.stderr
    assert (tmp_path / "m.db").exists()
    listed = run_python(["-m", "service.cli", "jobs"], env)
    assert listed.returncode == cli.EXIT_USAGE
    assert "error: argument --url: 'api:8000' is not an http:// or https://" in listed.stderr


@pytest.mark.parametrize("url", ["http://api:8000/?x=1", "http://api:8000#top", "http://api:8000?"])
def test_a_url_with_a_query_or_fragment_is_a_bad_command_line(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--url", url, "jobs"])
    assert exit_.value.code == cli.EXIT_USAGE
    assert "has a query or fragment" in capsys.readouterr().err


@pytest.mark.parametrize("port", ["83937", "99999", "0"])
def test_a_url_with_a_port_out_of_range_is_a_bad_command_line(
    port: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """httpx takes 83937, and the connection went to 83937 - 65536, the API key with it."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--url", f"http://127.0.0.1:{port}", "jobs"])
    assert exit_.value.code == cli.EXIT_USAGE
    assert f"names port {port}: ports are 1–65535" in capsys.readouterr().err


def test_a_migration_that_cannot_run_says_why_in_one_line(tmp_path: Path) -> None:
    """Alembic's traceback (50 to 130 lines, exit 1) for a database newer than the code, one it
    cannot open: one line each, exit 2 where no retry helps."""
    url = f"sqlite:///{tmp_path / 'm.db'}"
    migrated = run_python(["-m", "service.cli", "migrate"], service_env(database_url=url))
    assert migrated.returncode == 0, migrated.stderr
    stamp_revision(url, "0099")
    newer = run_python(["-m", "service.cli", "migrate"], service_env(database_url=url))
    assert newer.returncode == 2, newer.stderr
    assert "Can't locate revision identified by '0099'" in newer.stderr
    assert "migrated by newer code" in newer.stderr and "Traceback" not in newer.stderr
    (tmp_path / "folder.db").mkdir()  # a folder is no database file
    folder = service_env(database_url=f"sqlite:///{tmp_path / 'folder.db'}")
    failed = run_python(["-m", "service.cli", "migrate"], folder)
    assert failed.returncode == 1, failed.stderr
    assert "the database was not migrated: " in failed.stderr
    assert "Traceback" not in failed.stderr
