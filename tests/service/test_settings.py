"""Settings come from MNIST_* variables and fail fast on nonsense."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import REFUSED_EXIT_STATUS, Settings, get_settings


def test_environment_variables_with_the_prefix_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MNIST_DATABASE_URL", "postgresql+psycopg://u@h/db")
    monkeypatch.setenv("MNIST_DATA_DIR", "/data/mnist")
    monkeypatch.setenv("MNIST_DEVICE", "cpu")
    monkeypatch.setenv("MNIST_PORT", "9001")
    settings = Settings()
    assert settings.database_url == "postgresql+psycopg://u@h/db"
    assert settings.data_dir == Path("/data/mnist")
    assert (settings.device, settings.port) == ("cpu", 9001)


def test_defaults_match_make_run(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "DATABASE_URL",
        "DATA_DIR",
        "CHECKPOINT_DIR",
        "HOST",
        "PORT",
        "DEVICE",
        "ARTIFACTS",
    ):
        monkeypatch.delenv(f"MNIST_{name}", raising=False)
    settings = Settings()
    assert settings.database_url == "sqlite:///./var/mnist.db"
    assert settings.checkpoint_dir == Path("./var/models")
    assert settings.artifacts == "folder"  # auto on SQLite: one machine (README)
    assert settings.data_dir == Path("./data")
    assert (settings.host, settings.port, settings.device) == ("127.0.0.1", 8000, "auto")


@pytest.mark.parametrize(
    ("url", "chosen"),
    [
        ("sqlite:///./var/mnist.db", "folder"),
        ("postgresql+psycopg://postgres@db:5432/mnist", "database"),
    ],
)
def test_artifacts_auto_picks_by_the_database(
    monkeypatch: pytest.MonkeyPatch, url: str, chosen: str
) -> None:
    monkeypatch.delenv("MNIST_ARTIFACTS", raising=False)
    assert Settings(database_url=url).artifacts == chosen
    for explicit in ("database", "folder"):  # a value set is kept, on every database
        assert Settings(database_url=url, artifacts=explicit).artifacts == explicit


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("MNIST_DEVICE", "tpu", "device"),
        ("MNIST_ARTIFACTS", "s3", "artifacts"),
        ("MNIST_PORT", "0", "port"),
        ("MNIST_DATABASE_URL", "mysql://x", "sqlite:// or postgresql://"),
        ("MNIST_HEARTBEAT_S", "60", "shorter than MNIST_LEASE_S"),
        ("MNIST_RETENTION_DAYS", "0", "retention_days"),
        ("MNIST_RETENTION_DAYS", "-3", "retention_days"),
        ("MNIST_RETENTION_DAYS", "a week", "retention_days"),
        ("MNIST_MAX_JOB_STEPS", "0", "max_job_steps"),
        ("MNIST_MAX_SWEEP_TRIALS", "0", "max_sweep_trials"),
        ("MNIST_MAX_SWEEP_TRIALS", "10001", "max_sweep_trials"),
        # Values that passed, then failed at run time (dates out of range, floats to ints).
        ("MNIST_DATABASE_URL", "sqlite-nonsense", "sqlite:// or postgresql://"),
        ("MNIST_DATABASE_URL", "postgresql+asyncpg://x/y", "sqlite:// or postgresql://"),
        ("MNIST_DATABASE_URL", "sqlite+aiosqlite:///x.db", "sqlite:// or postgresql://"),
        ("MNIST_RETENTION_DAYS", "1000000000", "retention_days"),
        ("MNIST_LEASE_S", "1e12", "lease_s"),
        ("MNIST_LEASE_S", "inf", "lease_s"),
        ("MNIST_MAX_RUNTIME_S", "inf", "max_runtime_s"),
        ("MNIST_SHUTDOWN_GRACE_S", "inf", "shutdown_grace_s"),
        ("MNIST_FLUSH_INTERVAL_S", "nan", "flush_interval_s"),
    ],
)
def test_bad_values_fail_at_start(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=message):
        Settings()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MNIST_API_KEY": "short"}, "at least 16 characters"),
        ({"MNIST_API_KEY": "has a space in the key!"}, "printable ASCII without spaces"),
        ({"MNIST_READONLY_API_KEY": "readonly-key-0123456789"}, "needs MNIST_API_KEY"),
        (
            {"MNIST_API_KEY": "same-key-012345678", "MNIST_READONLY_API_KEY": "same-key-012345678"},
            "must differ",
        ),
        ({"MNIST_MAX_REQUEST_BYTES": "20000", "MNIST_MAX_UPLOAD_BYTES": "20000"}, "larger than"),
        ({"MNIST_MAX_QUEUED_JOBS": "0"}, "max_queued_jobs"),
        (
            {"MNIST_MAX_REQUEST_LINE_BYTES": "8192", "MNIST_MAX_HEADER_BYTES": "8192"},
            "REQUEST_LINE_BYTES must be smaller",
        ),
        (
            {"MNIST_MAX_EVENT_STREAMS": "200", "MNIST_MAX_CONNECTIONS": "100"},
            "EVENT_STREAMS must not exceed",
        ),
        ({"MNIST_HEADER_TIMEOUT_S": "0"}, "header_timeout_s"),
        ({"MNIST_MAX_CONNECTIONS": "0"}, "max_connections"),
    ],
)
def test_bad_keys_and_limits_fail_at_start(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for name in ("MNIST_API_KEY", "MNIST_READONLY_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=message):
        Settings()


def test_keys_are_secret_and_an_empty_one_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MNIST_API_KEY", "the-full-key-0123456789")
    monkeypatch.setenv("MNIST_READONLY_API_KEY", "")
    settings = Settings()
    assert settings.api_key is not None
    assert settings.api_key.get_secret_value() == "the-full-key-0123456789"
    assert "the-full-key" not in repr(settings) and "the-full-key" not in str(settings)
    assert settings.readonly_api_key is None
    assert settings.allow_no_auth is False and settings.docs_public is True


def test_form_parts_must_leave_room_for_predicts_image_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MNIST_MAX_IMAGES_PER_REQUEST", "16")
    monkeypatch.setenv("MNIST_MAX_FORM_PARTS", "16")
    with pytest.raises(ValidationError, match="MNIST_MAX_FORM_PARTS must be larger"):
        Settings()


def test_serving_and_thread_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("API_WORKERS", "ACCESS_LOG", "TORCH_THREADS"):
        monkeypatch.delenv(f"MNIST_{name}", raising=False)
    defaults = Settings()
    assert (defaults.api_workers, defaults.access_log, defaults.torch_threads) == (1, True, "auto")
    monkeypatch.setenv("MNIST_TORCH_THREADS", "2")
    assert Settings().torch_threads == 2
    for wrong in ("0", "two", "300"):
        monkeypatch.setenv("MNIST_TORCH_THREADS", wrong)
        with pytest.raises(ValidationError, match="torch_threads"):
            Settings()
    monkeypatch.delenv("MNIST_TORCH_THREADS")
    monkeypatch.setenv("MNIST_API_WORKERS", "2")
    monkeypatch.setenv("MNIST_ACCESS_LOG", "false")
    assert (Settings().api_workers, Settings().access_log) == (2, False)
    monkeypatch.setenv("MNIST_API_WORKERS", "0")
    with pytest.raises(ValidationError, match="api_workers"):
        Settings()


@pytest.mark.parametrize(
    ("written", "bound"), [("[::1]", "::1"), ("::1", "::1"), ("0.0.0.0", "0.0.0.0")]
)
def test_an_ipv6_host_written_as_in_a_url_is_bound_bare(
    monkeypatch: pytest.MonkeyPatch, written: str, bound: str
) -> None:
    """uvicorn could not resolve "[::1]" (exit 3), which the exposure check took for loopback."""
    monkeypatch.setenv("MNIST_HOST", written)
    monkeypatch.setenv("MNIST_LOG_LEVEL", "debug")
    settings = Settings()
    assert (settings.host, settings.log_level) == (bound, "DEBUG")


def test_decodes_default_to_the_cores_at_most_8_and_16_mpx_are_accepted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("MAX_DECODES", "MAX_DECODE_QUEUE", "MAX_IMAGE_PIXELS"):
        monkeypatch.delenv(f"MNIST_{name}", raising=False)
    for cores, slots in ((None, 1), (2, 2), (8, 8), (64, 8)):
        monkeypatch.setattr("os.cpu_count", lambda cores=cores: cores)
        assert Settings().max_decodes == slots
    settings = Settings()
    assert settings.max_decode_queue == 64
    assert settings.max_image_pixels >= 4000 * 4000  # the upload is under the cap
    for name, value in (("MNIST_MAX_DECODES", "0"), ("MNIST_MAX_DECODE_QUEUE", "-1")):
        monkeypatch.setenv(name, value)
        with pytest.raises(ValidationError, match=name.removeprefix("MNIST_").lower()):
            Settings()
        monkeypatch.delenv(name)


def test_retention_is_off_unless_set_and_the_steps_budget_has_a_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MNIST_RETENTION_DAYS", raising=False)
    monkeypatch.delenv("MNIST_MAX_JOB_STEPS", raising=False)
    assert Settings().retention_days is None
    assert Settings().max_job_steps == 1_000_000
    monkeypatch.delenv("MNIST_MAX_SWEEP_TRIALS", raising=False)
    assert Settings().max_sweep_trials == 256
    monkeypatch.setenv("MNIST_RETENTION_DAYS", "")  # compose's ${MNIST_RETENTION_DAYS:-}
    assert Settings().retention_days is None
    monkeypatch.setenv("MNIST_RETENTION_DAYS", "30")
    assert Settings().retention_days == 30


def test_a_refused_environment_exits_2_saying_what_is_wrong_without_its_values(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A traceback printed the key given, and its exit status 1 had systemd retry it forever.
    monkeypatch.setenv("MNIST_API_KEY", "my secret key with spaces 12345")
    monkeypatch.setenv("MNIST_PORT", "0")
    get_settings.cache_clear()
    try:
        with pytest.raises(SystemExit) as exited:
            get_settings()
    finally:
        get_settings.cache_clear()
    assert exited.value.code == REFUSED_EXIT_STATUS == 2
    said = capsys.readouterr().err
    assert "mnist-service: MNIST_PORT: Input should be greater than or equal to 1" in said
    assert "mnist-service: MNIST_API_KEY: Value error, API keys must be printable ASCII" in said
    assert "secret" not in said and "Traceback" not in said
