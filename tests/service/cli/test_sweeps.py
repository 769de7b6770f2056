"""``mnist-service sweep`` and ``sweeps`` against a real app: local checks by the API's own
models (exit 2 naming the option), the live trial table, exit codes, the listing."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from typing import cast

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from service.cli import commands as cli
from service.cli.client import Client
from service.cli.sweeps import watch_sweep
from service.settings import Settings
from tests.service.cli.test_commands import run
from tests.support import SMALL_TEST, SMALL_TRAIN
from workers.worker import Worker

TINY = (
    *("--param", "epochs=1", "--param", f"trainset_size={SMALL_TRAIN}"),
    *("--param", f"testset_size={SMALL_TEST}"),
)


@pytest.fixture
def two_jobs_worker(
    api_settings: Settings, sessions: sessionmaker[Session]
) -> Iterator[threading.Thread]:
    """A worker that trains the next two jobs in the background."""
    worker = Worker(api_settings, sessions, show_progress=False)
    thread = threading.Thread(target=worker.run, kwargs={"max_jobs": 2}, daemon=True)
    thread.start()
    yield thread
    worker.stop.set()
    thread.join(timeout=30)


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (("--grid", "learning_rate=0.001,2"), "argument --grid learning_rate: "),
        (("--grid", "lr=0.1"), "argument --grid lr: "),
        (("--grid", "seed"), "argument --grid: 'seed' is not FIELD=VALUE"),
        (("--param", "epochs=0", "--grid", "seed=1"), "argument --param epochs: "),
        (
            ("--random-trials", "2", "--space", "learning_rate=uniform:0:0.1"),
            "argument --space learning_rate: ",
        ),
        (("--random-trials", "2"), "argument --space: "),
        (("--space", "seed=int_uniform:0:3"), "argument --random-trials: "),
        (("--random-trials", "20000", "--space", "seed=choice:1:2"), "argument --random-trials"),
        (("--grid", "seed=1", "--promote", "no way"), "argument --promote: "),
        ((), "argument --grid or --random-trials: "),
    ],
)
def test_bad_values_are_a_bad_command_line_naming_the_option(
    client: TestClient, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], named: str
) -> None:
    code, out, err = run(client, capsys, "sweep", *argv)
    assert code == cli.EXIT_USAGE and out == ""
    assert f"mnist-service sweep: error: {named}" in err
    assert client.get("/sweeps").json()["sweeps"] == []  # nothing was sent


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (("--grid", "seed=0,1", "--grid", "seed=2,3"), "--grid: field 'seed' is named twice"),
        (
            ("--param", "epochs=1", "--param", "epochs=2", "--grid", "seed=0"),
            "--param: field 'epochs'",
        ),
        (("--param", "seed=1", "--grid", "seed=2,3"), "--grid: field 'seed' is named twice"),
        (
            ("--random-trials", "2", "--space", "seed=choice:1:2", "--space", "seed=choice:3"),
            "--space: field 'seed' is named twice (--space seed=choice:1:2 and",
        ),
        (
            ("--param", "seed=1", "--random-trials", "2", "--space", "seed=choice:1:2"),
            "--space: field 'seed' is named twice (--param seed=1 and",
        ),
    ],
)
def test_a_field_named_twice_is_a_bad_command_line_not_the_last_one_kept(
    client: TestClient, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], named: str
) -> None:
    code, out, err = run(client, capsys, "sweep", *argv)
    assert (code, out) == (cli.EXIT_USAGE, "")
    assert f"mnist-service sweep: error: argument {named}" in err
    assert client.get("/sweeps").json()["sweeps"] == []  # nothing was sent


def test_watch_shows_the_trials_until_success_and_the_listing_has_it(
    client: TestClient, capsys: pytest.CaptureFixture[str], two_jobs_worker: threading.Thread
) -> None:
    code, out, err = run(
        client, capsys, "sweep", *TINY, "--grid", "learning_rate=0.001,0.01", "--watch"
    )
    assert code == cli.EXIT_OK, err
    sweep_id, summary = out.strip().splitlines()
    assert summary.startswith(f"sweep {sweep_id} succeeded: best trial ")
    assert f"sweep {sweep_id}: running" in err and f"sweep {sweep_id}: succeeded" in err
    assert "LEARNING_RATE" in err and "0.01 " in err and "1/1" in err
    assert err.count("succeeded") >= 3  # the sweep's line and both trials'

    code, out, _ = run(client, capsys, "sweeps")
    assert code == cli.EXIT_OK
    header, row = out.strip().splitlines()
    assert header.split() == ["ID", "STATUS", "TRIALS", "ENDED", "BEST", "ACCURACY"]
    assert row.split()[:4] == [sweep_id, "succeeded", "2", "2"]


def test_watch_exits_non_zero_when_the_sweep_is_cancelled(
    client: TestClient, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(
        client, capsys, "sweep", "--random-trials", "2", "--space", "seed=int_uniform:0:9"
    )
    assert code == cli.EXIT_OK
    sweep_id = out.strip()
    api = Client("http://testserver", http=cast(httpx.Client, client))

    def cancel_once(_: float) -> None:  # the watch's pause: the sweep is cancelled meanwhile
        client.post(f"/sweeps/{sweep_id}/cancel")

    table = io.StringIO()
    final = watch_sweep(api, sweep_id, table, sleep=cancel_once)
    assert final["status"] == "cancelled"
    assert f"sweep {sweep_id}: running" in table.getvalue()
    assert f"sweep {sweep_id}: cancelled" in table.getvalue()


def test_the_listing_says_when_there_is_none(
    client: TestClient, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(client, capsys, "sweeps", "--json")
    assert (code, out.strip()) == (cli.EXIT_OK, "[]")
    code, _, err = run(client, capsys, "sweeps")
    assert "no sweeps yet" in err


def test_a_sweep_is_cancelled_and_deleted_from_the_command_line(
    client: TestClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """There was no way: `cancel` took the id for a job's (404), and a trial's `delete` was
    told to DELETE /sweeps/{id}, which no command did."""
    code, out, _ = run(client, capsys, "sweep", "--grid", "seed=0,1")
    sweep_id = out.strip()
    trial = client.get(f"/sweeps/{sweep_id}").json()["trials"][0]["job_id"]
    code, out, _ = run(client, capsys, "cancel", "--sweep", sweep_id)
    assert (code, out.strip()) == (
        cli.EXIT_OK,
        f"sweep {sweep_id} is cancelled: its running trials stop shortly",
    )
    assert client.get(f"/jobs/{trial}").json()["status"] == "cancelled"
    code, _, err = run(client, capsys, "delete", trial)
    assert code == cli.EXIT_API_ERROR and sweep_id in err  # a trial goes with its sweep
    code, out, _ = run(client, capsys, "delete", "--sweep", sweep_id)
    assert (code, out.strip()) == (cli.EXIT_OK, f"deleted sweep {sweep_id}")
    assert client.get(f"/sweeps/{sweep_id}").status_code == 404
    assert client.get(f"/jobs/{trial}").status_code == 404
