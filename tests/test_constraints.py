"""constraints.txt: the versions ``make install`` installs, which every requirement of the
project's must have, within the ranges pyproject.toml declares; and the suite runs on them."""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.support import REPO_ROOT

CONSTRAINTS = REPO_ROOT / "constraints.txt"


def platform_builds() -> re.Pattern[str]:
    """The Makefile's ``PLATFORM_BUILDS``: what comes with the platform's build of PyTorch (a
    CPU or a CUDA index), which ``make lock`` leaves out, as ``name==`` matches it."""
    makefile = (REPO_ROOT / "Makefile").read_text()
    (pattern,) = re.findall(r"^PLATFORM_BUILDS := (.+)$", makefile, flags=re.MULTILINE)
    return re.compile(pattern, flags=re.IGNORECASE)


def pins() -> dict[str, Version]:
    """constraints.txt's pins by canonical name; raises on a line that is not ``name==version``."""
    pinned: dict[str, Version] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        requirement = Requirement(line)
        (spec,) = requirement.specifier
        assert spec.operator == "==", line
        pinned[canonicalize_name(requirement.name)] = Version(spec.version)
    return pinned


def requirements() -> list[Requirement]:
    """pyproject.toml's dependencies and every extra's."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        lines += extra
    return [Requirement(line) for line in lines]


def test_every_requirement_is_pinned_within_its_range() -> None:
    pinned = pins()
    platform = platform_builds()
    for requirement in requirements():
        name = canonicalize_name(requirement.name)
        if platform.match(f"{name}=="):
            continue
        assert name in pinned, f"{requirement} is not pinned in constraints.txt (make lock)"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"constraints.txt pins {name}=={pinned[name]}, outside pyproject.toml's {requirement}"
        )


def test_the_suite_runs_on_the_pinned_versions() -> None:
    """``make install`` (which ``make test`` and CI run first) installs constraints.txt's
    versions: an environment installed otherwise tests something else than CI does."""
    if Path(sys.prefix).resolve() != (REPO_ROOT / ".venv").resolve():
        pytest.skip(f"{sys.prefix} is not the .venv that make install builds")
    differ = {}
    for name, version in pins().items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            continue  # a pin of another platform's, or of a dependency no longer needed
        if installed != version:
            differ[name] = f"installed {installed}, pinned {version}"
    assert not differ, differ


def test_nothing_of_the_platforms_pytorch_build_is_pinned() -> None:
    """A CUDA build's libraries pinned here would hold every install to that build's CUDA (or
    fail one from another index, such as the image's cu126)."""
    platform = platform_builds()
    assert platform.match("torch==") and platform.match("cuda-toolkit==")
    assert platform.match("nvidia-cublas==") and not platform.match("torchmetrics==")
    assert [name for name in pins() if platform.match(f"{name}==")] == []
