"""The command line against a real app: submit (and watch), jobs, metrics, predict, cancel."""

from __future__ import annotations

import csv
import io
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from service.cli import commands as cli
from service.cli.client import DEFAULT_URL
from service.schemas import JobCreate
from service.settings import Settings
from tests.records import FakeTraining
from tests.service.api.routes.conftest import train_job
from tests.service.cli.conftest import JOB_ID
from tests.service.images import png
from tests.support import SMALL_TEST, SMALL_TRAIN, free_port, synthetic_digits
from workers.worker import Worker

COMMANDS = [
    *("submit", "jobs", "sweep", "sweeps", "metrics", "predict", "cancel", "delete"),
    *("api", "worker", "migrate", "run"),
]


def run(client: TestClient, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv), http=cast(httpx.Client, client))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def worker_thread(
    api_settings: Settings, sessions: sessionmaker[Session]
) -> Iterator[threading.Thread]:
    """A worker that trains the next job in the background."""
    worker = Worker(api_settings, sessions, show_progress=False)
    thread = threading.Thread(target=worker.run, kwargs={"max_jobs": 1}, daemon=True)
    thread.start()
    yield thread
    worker.stop.set()
    thread.join(timeout=30)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: mnist-service {command}")
    assert "MNIST_URL" in out


def test_submit_offers_every_field_of_the_api() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["submit", "--learning-rate", "0.01", "--max-runtime-s", "60"])
    assert set(JobCreate.model_fields) <= set(vars(args))
    assert (args.learning_rate, args.max_runtime_s, args.epochs) == (0.01, 60.0, None)
    with pytest.raises(SystemExit):
        parser.parse_args(["submit", "--epochs", "two"])


def test_the_url_comes_from_the_flag_the_environment_or_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MNIST_URL", raising=False)
    assert cli.build_parser().parse_args(["jobs"]).url == DEFAULT_URL
    monkeypatch.setenv("MNIST_URL", "http://api:9000")
    assert cli.build_parser().parse_args(["jobs"]).url == "http://api:9000"
    assert cli.build_parser().parse_args(["--url", "http://x", "jobs"]).url == "http://x"


@pytest.mark.parametrize("url", ["localhost:8000", "http://", "ftp://x", "http://[::1", ""])
def test_a_bad_url_is_a_bad_command_line(
    url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--url", url, "jobs"])
    assert exit_.value.code == cli.EXIT_USAGE
    assert "error: argument --url: " in capsys.readouterr().err
    monkeypatch.setenv("MNIST_URL", url or " ")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["jobs"])
    assert exit_.value.code == cli.EXIT_USAGE


def test_submit_sends_only_the_given_fields(
    client: TestClient, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(client, capsys, "submit", "--epochs", "2", "--seed", "5")
    assert code == cli.EXIT_OK
    job = client.get(f"/jobs/{out.strip()}").json()
    assert job["params"] == {**JobCreate().model_dump(), "epochs": 2, "seed": 5}


@pytest.mark.parametrize(
    ("argv", "problems"),
    [
        (["--learning-rate", "nan"], ["--learning-rate: Input should be a finite number"]),
        (["--learning-rate", "inf"], ["--learning-rate: Input should be a finite number"]),
        (["--max-runtime-s=-inf"], ["--max-runtime-s: Input should be a finite number"]),
        (["--learning-rate", "1e400"], ["--learning-rate: Input should be a finite number"]),
        (
            ["--epochs", "0", "--learning-rate", "2"],
            [
                "--epochs: Input should be greater than or equal to 1",
                "--learning-rate: Input should be less than or equal to 1",
            ],
        ),
        (["--seed", "-1"], ["--seed: Input should be greater than or equal to 0"]),
    ],
)
def test_a_bad_job_option_is_a_bad_command_line_checked_by_the_apis_schema(
    client: TestClient, capsys: pytest.CaptureFixture[str], argv: list[str], problems: list[str]
) -> None:
    code, out, err = run(client, capsys, "submit", *argv)
    assert code == cli.EXIT_USAGE and out == ""
    assert err.startswith("mnist-service submit: error: argument --")
    for problem in problems:
        assert problem in err
    assert "Traceback" not in err
    assert client.get("/jobs").json()["jobs"] == []  # nothing was sent


def test_a_wrong_type_is_argparses_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["submit", "--epochs", "two"])
    assert exit_.value.code == cli.EXIT_USAGE
    assert "argument --epochs: invalid int value: 'two'" in capsys.readouterr().err


def test_the_apis_refusal_is_shown_once(
    client: TestClient, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(client, capsys, "cancel", "0" * 32)
    assert code == cli.EXIT_API_ERROR and out == ""
    assert err.count(f"no job with id {'0' * 32}") == 1, err


def test_an_unreachable_api_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["--url", f"http://127.0.0.1:{free_port()}", "jobs"])
    assert code == cli.EXIT_API_ERROR
    assert "cannot reach the API" in capsys.readouterr().err


@pytest.mark.usefixtures("worker_thread")
def test_watch_shows_a_bar_per_epoch_until_success(
    client: TestClient, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(
        client,
        capsys,
        *("submit", "--epochs", "2", "--trainset-size", str(SMALL_TRAIN)),
        *("--testset-size", str(SMALL_TEST), "--seed", "1", "--watch"),
    )
    assert code == cli.EXIT_OK, err
    job_id, summary = out.strip().splitlines()
    assert summary.startswith(f"job {job_id} succeeded: test accuracy")
    assert "epoch 1/2" in err and "epoch 2/2" in err
    assert "10/10" in err  # 640 images, batch 64: ten steps per epoch
    assert "loss=" in err and "acc=" in err
    assert "attempt" not in err  # the first claim is no retry


def test_watch_exits_non_zero_when_the_job_fails(
    client: TestClient,
    capsys: pytest.CaptureFixture[str],
    api_settings: Settings,
    sessions: sessionmaker[Session],
) -> None:
    worker = Worker(api_settings, sessions, show_progress=False)
    thread = threading.Thread(target=worker.run, kwargs={"max_jobs": 1}, daemon=True)
    thread.start()
    # More training images than the suite's data set holds: the job fails (a missing data set
    # would be the worker's fault, and the job handed back).
    too_many = str(SMALL_TRAIN + 1)
    code, _, err = run(client, capsys, "submit", "--trainset-size", too_many, "--watch")
    thread.join(timeout=30)
    assert code == cli.EXIT_JOB_FAILED
    assert "failed:" in err


def test_jobs_metrics_and_cancel(
    client: TestClient, capsys: pytest.CaptureFixture[str], sessions: sessionmaker[Session]
) -> None:
    training = FakeTraining(sessions, JobCreate(epochs=2, batch_size=10, trainset_size=25))
    job_id = training.submit()
    training.claim()
    training.run_epoch(0.5)
    training.run_epoch(0.75)
    training.finish()
    queued = client.post("/jobs", json={}).json()["id"]

    code, out, _ = run(client, capsys, "jobs")
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["ID", "STATUS", "EPOCH", "STEP", "ACCURACY", "DEVICE", "AGE"]
    assert rows[0].split()[:2] == [queued, "queued"]
    assert rows[1].split()[:5] == [job_id, "succeeded", "2/2", "6/6", "75.00%"]

    code, out, _ = run(client, capsys, "metrics", job_id)
    assert "succeeded, 6 steps recorded" in out and "epoch 2: test accuracy 75.00%" in out

    code, out, _ = run(client, capsys, "metrics", job_id, "--csv")
    table = list(csv.DictReader(io.StringIO(out)))
    assert [int(r["step"]) for r in table] == [1, 2, 3, 4, 5, 6]
    assert [r["test_accuracy"] for r in table] == ["", "", "0.5", "", "", "0.75"]
    assert float(table[0]["loss"]) == pytest.approx(2.3)

    code, out, _ = run(client, capsys, "cancel", queued)
    assert code == 0 and out.strip() == f"job {queued} cancelled"
    code, _, err = run(client, capsys, "cancel", queued)
    assert code == cli.EXIT_API_ERROR and "already ended" in err
    code, _, err = run(client, capsys, "metrics", "f" * 32)
    assert code == cli.EXIT_API_ERROR and "no job with id" in err


@pytest.fixture
def job_id(client: TestClient, sessions: sessionmaker[Session], api_settings: Settings) -> str:
    """A job trained by a real worker on the generated digits: its model answers predict."""
    return train_job(client, sessions, api_settings)


def digit_files(folder: Path, n: int) -> tuple[list[Path], np.ndarray]:
    """``n`` generated digits as PNG files in ``folder``, and their labels."""
    images, labels = synthetic_digits(n, seed=5)
    paths = [folder / f"digit-{i}.png" for i in range(n)]
    for path, pixels in zip(paths, images, strict=True):
        path.write_bytes(png(pixels))
    return paths, labels


def test_predict_prints_the_digit_and_its_probabilities(
    client: TestClient, capsys: pytest.CaptureFixture[str], job_id: str, tmp_path: Path
) -> None:
    paths, labels = digit_files(tmp_path, 1)
    image = str(paths[0])

    code, out, _ = run(client, capsys, "predict", image)
    assert code == 0
    first, *bars = out.splitlines()
    assert first.startswith(f"digit {labels[0]} (") and first.endswith(job_id)
    assert len(bars) == 10 and bars[int(labels[0])].endswith("←")

    code, out, _ = run(client, capsys, "predict", image, "--job", job_id, "--json")
    answer = json.loads(out)
    assert answer["job_id"] == job_id and answer["digit"] == int(np.argmax(answer["probabilities"]))

    code, _, err = run(client, capsys, "predict", str(tmp_path / "missing.png"))
    assert code == cli.EXIT_USAGE and "cannot read" in err
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("hello")
    code, _, err = run(client, capsys, "predict", str(not_an_image))
    assert code == cli.EXIT_API_ERROR and "not an image" in err


def test_predict_takes_several_files_an_alias_or_a_job(
    client: TestClient, capsys: pytest.CaptureFixture[str], job_id: str, tmp_path: Path
) -> None:
    paths, _ = digit_files(tmp_path, 3)
    names = [str(p) for p in paths]
    # What the API itself answers for these images, one request each.
    expected = [
        client.post("/predict", files={"file": p.read_bytes()}).json()["digit"] for p in paths
    ]

    code, out, err = run(client, capsys, "predict", *names)
    assert code == cli.EXIT_OK, err
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == [p.name for p in paths]  # one line per file
    assert [int(line.split()[2]) for line in lines] == expected
    assert f"by the model of job {job_id}" in err

    code, out, _ = run(client, capsys, "predict", *names, "--json")
    batch = json.loads(out)
    assert batch["job_id"] == job_id
    assert [p["digit"] for p in batch["predictions"]] == expected

    # An alias (sent as ?model=), and no alias of that name.
    code, _, err = run(client, capsys, "predict", names[0], "--model", "production")
    assert code == cli.EXIT_API_ERROR
    assert err.count("production") == 1 and "error:" in err and "pattern" not in err
    assert client.put("/models/aliases/production", json={"job_id": job_id}).status_code == 200
    code, out, _ = run(client, capsys, "predict", names[0], "--model", "production", "--json")
    assert code == cli.EXIT_OK and json.loads(out)["job_id"] == job_id
    code, out, _ = run(
        client, capsys, "predict", names[0], "--model", "production", "--job", job_id, "--json"
    )
    assert code == cli.EXIT_OK and json.loads(out)["job_id"] == job_id

    # A job that is none: the API's refusal, printed once.
    missing = "0" * 32
    code, out, err = run(client, capsys, "predict", names[0], "--job", missing)
    assert code == cli.EXIT_API_ERROR and out == ""
    assert err.count(missing) == 1, err

    # The API's files[1] is named by its file.
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("hello")
    code, _, err = run(client, capsys, "predict", names[0], str(not_an_image))
    assert code == cli.EXIT_API_ERROR and "notes.txt" in err and "files[1]" not in err

    code, _, err = run(client, capsys, "predict", "-", "-")
    assert code == cli.EXIT_USAGE and "once" in err


def test_predict_help_says_how_the_api_picks_the_model(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        cli.main(["predict", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--model ALIAS" in out and "--job JOB_ID" in out
    assert "production alias's model if the alias is set, else the latest succeeded job's" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["delete", "../models/aliases/production"],  # reached the alias, and deleted it
        ["cancel", "../sweeps/0192a3b4c5d6e7f8091a2b3c4d5e6f70"],
        ["metrics", "../../etc/passwd"],
        ["predict", "--job", "not-an-id", "digit.png"],
        ["jobs", "--limit", "1000"],
        ["sweeps", "--limit", "0"],
        ["--api-key", "ключ-ключ-ключ-ключ", "jobs"],
        ["--api-key", "a-key-0123456789\nX: 1", "jobs"],
    ],
)
def test_what_the_api_would_refuse_or_misread_is_a_bad_command_line(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # Nothing is sent: an id goes in the request's path, a key in a header.
    def no_request(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a request was sent")

    with pytest.raises(SystemExit) as exit_:
        cli.main(argv, http=cast(httpx.Client, SimpleNamespace(request=no_request)))
    assert exit_.value.code == cli.EXIT_USAGE
    said = capsys.readouterr().err
    assert "error: argument" in said and "Traceback" not in said
    assert "ключ" not in said and "0123456789" not in said  # a key is never echoed


def test_a_file_name_that_is_not_utf8_is_sent_replaced(
    client: TestClient, capsys: pytest.CaptureFixture[str], tmp_path: Path, job_id: str
) -> None:
    name = tmp_path / os.fsdecode(b"na\xefve-\xff.png")
    name.write_bytes(png(synthetic_digits(1, seed=5)[0][0]))
    code, out, err = run(client, capsys, "predict", str(name))
    assert code == cli.EXIT_OK, err
    assert out.startswith("digit ")


def test_an_api_answering_json_of_other_shapes_is_not_the_service(
    capsys: pytest.CaptureFixture[str], stub_url: str
) -> None:
    code = cli.main(["--url", f"{stub_url}/odd", "jobs"])
    assert code == cli.EXIT_API_ERROR
    said = capsys.readouterr().err
    assert "answered JSON the MNIST service does not send" in said and "Traceback" not in said


@pytest.mark.parametrize(
    "argv", [["delete", JOB_ID], ["cancel", JOB_ID], ["submit", "--epochs", "1"]]
)
def test_a_server_answering_anything_is_not_taken_for_success(
    argv: list[str], capsys: pytest.CaptureFixture[str], stub_url: str
) -> None:
    # It answered 200 with JSON that is no job: "deleted", "job None is x" and "None" were
    # printed, exit 0.
    assert cli.main(["--url", f"{stub_url}/any", *argv]) == cli.EXIT_API_ERROR
    out, err = capsys.readouterr()
    assert out == "" and "answered JSON the MNIST service does not send" in err
