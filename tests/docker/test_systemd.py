"""docker/mnist-service.service: systemd accepts it; it stops and restarts `run` by its rules."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service.settings import REFUSED_EXIT_STATUS, Settings
from tests.support import REPO_ROOT
from workers.supervisor import SHUTDOWN_MARGIN_S

UNIT = REPO_ROOT / "docker" / "mnist-service.service"
INSTALLED = "/opt/mnist-service/venv/bin/mnist-service"


def service_section() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser["Service"]


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd)")
    # verify wants the commands to exist: an executable that does here stands in for them.
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(INSTALLED, sys.executable))
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert UNIT.name not in result.stderr  # warnings (an unknown key, a bad value) name the file


def test_the_unit_runs_the_supervisor_and_restarts_it_unless_refused() -> None:
    service = service_section()
    assert service["ExecStartPre"] == f"{INSTALLED} migrate"
    assert service["ExecStart"].startswith(f"{INSTALLED} run --workers ")
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == str(REFUSED_EXIT_STATUS)
    # SIGTERM to the supervisor alone, which forwards it once; time for the children's stop.
    assert (service["KillMode"], service["KillSignal"]) == ("mixed", "SIGTERM")
    default_grace_s = Settings.model_fields["shutdown_grace_s"].default
    assert float(service["TimeoutStopSec"]) > default_grace_s + SHUTDOWN_MARGIN_S
    assert service["WorkingDirectory"] == f"/var/lib/{service['StateDirectory']}"
