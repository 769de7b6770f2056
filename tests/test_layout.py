"""The layout is the architecture: which package may import which, and modules of one job.

The API is the outermost layer: the store, the domain, serving and the workers never import
it, so a worker process never loads the web app and the store can be reasoned about alone.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_MODULE_LINES = 400
MAX_MODULES_PER_FOLDER = 12

# package → the packages it must never import (prefix match on the dotted name)
FORBIDDEN = {
    "service.store": ("service.api", "service.serving", "service.domain", "service.cli"),
    "service.domain": ("service.api", "service.serving", "service.cli"),
    "service.serving": ("service.api", "service.cli"),
    "service.api": ("service.cli",),
    "workers": ("service.api", "service.serving", "service.cli"),
    "service.cli": (),  # the outermost layer (its package's __init__ is no shared module)
}
# the shared modules at the top of service/ (settings, errors, schemas, ...) import no layer
SHARED_FORBIDDEN = (
    "service.api",
    "service.serving",
    "service.domain",
    "service.store",
    "service.cli",
)


def _modules() -> list[tuple[str, Path]]:
    found = []
    for top in ("service", "workers"):
        for path in sorted((ROOT / top).rglob("*.py")):
            dotted = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found.append((dotted.removesuffix(".__init__"), path))
    return found


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _forbidden_for(module: str) -> tuple[str, ...]:
    for package, forbidden in FORBIDDEN.items():
        if module == package or module.startswith(package + "."):
            return forbidden
    if module.count(".") == 1 and module.startswith("service.") and module != "service.__main__":
        return SHARED_FORBIDDEN
    return ()


@pytest.mark.parametrize(("module", "path"), _modules(), ids=lambda v: str(v))
def test_no_module_imports_an_outer_layer(module: str, path: Path) -> None:
    forbidden = _forbidden_for(module)
    wrong = sorted(
        name
        for name in _imports(path)
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    )
    assert wrong == [], f"{module} imports {wrong}"


def test_the_rule_catches_a_store_module_importing_the_api(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from service.api.app import create_app\nimport service.serving.imaging\n")
    found = _imports(bad)
    forbidden = _forbidden_for("service.store.bad")
    assert [n for n in found if any(n.startswith(f) for f in forbidden)]


def test_modules_do_one_job() -> None:
    long = {
        str(path.relative_to(ROOT)): n
        for _, path in _modules()
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_folders_hold_few_modules() -> None:
    crowded = {}
    for top in ("service", "workers"):
        for folder in [ROOT / top, *(p for p in (ROOT / top).rglob("*") if p.is_dir())]:
            n = len(list(folder.glob("*.py")))
            if n > MAX_MODULES_PER_FOLDER:
                crowded[str(folder.relative_to(ROOT))] = n
    assert crowded == {}, f"folders with more than {MAX_MODULES_PER_FOLDER} modules: {crowded}"
