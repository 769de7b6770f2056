"""The wheel carries the dashboard and the migrations: installed, the service migrates a database
from any working directory, with no checkout and no alembic.ini.

The wheel is built from what docker/Dockerfile copies into its build stage, so this also checks
that the image's build has every file the wheel needs.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from service.store.engines import make_engine
from service.store.migrations import SCRIPTS, head_revisions
from tests.support import REPO_ROOT, run_python

DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
STATIC = REPO_ROOT / "service" / "api" / "static"
PACKAGED_SCRIPTS = f"service/store/{SCRIPTS}"
PIP = [sys.executable, "-m", "pip"]
OFFLINE = ["--no-deps", "--no-index", "--quiet"]
TABLES = {"jobs", "train_steps", "epoch_metrics", "workers", "model_aliases", "alembic_version"}


def build_stage_sources() -> list[tuple[str, str]]:
    """(source, destination) of each COPY in the Dockerfile's build stage."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    build_stage = text.split("\nFROM ")[1]
    copies = []
    for line in build_stage.splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            *sources, destination = shlex.split(line[5:])
            copies += [(source, destination) for source in sources]
    return copies


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built offline from a copy of what the image's build stage copies."""
    source = tmp_path_factory.mktemp("source")
    for name, destination in build_stage_sources():
        target = source / destination if not destination.endswith("/") else source / name
        if (REPO_ROOT / name).is_dir():
            shutil.copytree(REPO_ROOT / name, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO_ROOT / name, target)
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [*PIP, "wheel", *OFFLINE, "--no-build-isolation", "-w", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    [built] = out.glob("mnist_service-*.whl")
    return built


def test_the_wheel_holds_the_dashboard_and_every_migration(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    static = {f"service/api/static/{p.name}" for p in STATIC.iterdir() if p.is_file()}
    assert static and static <= names
    scripts = {
        f"{PACKAGED_SCRIPTS}/{p.relative_to(REPO_ROOT / SCRIPTS)}"
        for p in (REPO_ROOT / SCRIPTS).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert {f"{PACKAGED_SCRIPTS}/env.py", f"{PACKAGED_SCRIPTS}/script.py.mako"} <= scripts
    assert scripts <= names
    # Never a top-level package of that name: it would hide the alembic library.
    assert not [n for n in names if n.startswith(f"{SCRIPTS}/")]


def test_the_installed_service_migrates_a_database_anywhere(wheel: Path, tmp_path: Path) -> None:
    target, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run(
        [*PIP, "install", *OFFLINE, "--target", str(target), str(wheel)],
        check=True,
        timeout=120,
    )
    database = tmp_path / "fresh.db"
    # The installed package, not the checkout: the test fails if `service` comes from elsewhere.
    program = (
        "import sys, service, service.store.migrations as m\n"
        f"assert service.__file__.startswith({str(target)!r}), service.__file__\n"
        f"assert str(m.script_location()).startswith({str(target)!r}), m.script_location()\n"
        "from service.cli import main\n"
        "sys.exit(main(['migrate']))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNIST_")}
    env |= {"PYTHONPATH": str(target), "MNIST_DATABASE_URL": f"sqlite:///{database}"}
    result = run_python(["-c", program], env, timeout_s=120, cwd=elsewhere)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Running upgrade" in result.stderr  # alembic's steps, logged as the service logs
    assert list(elsewhere.iterdir()) == []
    engine = make_engine(f"sqlite:///{database}")
    try:
        assert set(inspect(engine).get_table_names()) >= TABLES
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT version_num FROM alembic_version"))
            versions = {version for (version,) in rows}
    finally:
        engine.dispose()
    assert versions == set(head_revisions())
