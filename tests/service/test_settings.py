"""Settings come from MNIST_* variables and fail fast on nonsense."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings


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
    for name in ("DATABASE_URL", "DATA_DIR", "CHECKPOINT_DIR", "HOST", "PORT", "DEVICE"):
        monkeypatch.delenv(f"MNIST_{name}", raising=False)
    settings = Settings()
    assert settings.database_url == "sqlite:///./var/mnist.db"
    assert settings.checkpoint_dir == Path("./var/models")
    assert settings.data_dir == Path("./data")
    assert (settings.host, settings.port, settings.device) == ("127.0.0.1", 8000, "auto")


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("MNIST_DEVICE", "tpu", "device"),
        ("MNIST_PORT", "0", "port"),
        ("MNIST_DATABASE_URL", "mysql://x", "sqlite:// or postgresql://"),
        ("MNIST_HEARTBEAT_S", "60", "shorter than MNIST_LEASE_S"),
    ],
)
def test_bad_values_fail_at_start(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=message):
        Settings()


def test_serving_and_thread_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("API_WORKERS", "ACCESS_LOG", "TORCH_THREADS"):
        monkeypatch.delenv(f"MNIST_{name}", raising=False)
    defaults = Settings()
    assert (defaults.api_workers, defaults.access_log, defaults.torch_threads) == (1, True, 1)
    monkeypatch.setenv("MNIST_API_WORKERS", "2")
    monkeypatch.setenv("MNIST_ACCESS_LOG", "false")
    assert (Settings().api_workers, Settings().access_log) == (2, False)
    monkeypatch.setenv("MNIST_API_WORKERS", "0")
    with pytest.raises(ValidationError, match="api_workers"):
        Settings()
