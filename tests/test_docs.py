"""The README: every setting documented, its limits the code's, its checkpoint snippet runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from service.api.routes.jobs import DEFAULT_STEPS_PAGE, MAX_STEPS_PAGE
from service.clock import MAX_PAGE
from service.ml import SimpleMLP, save_checkpoint
from service.settings import Settings
from tests.support import REPO_ROOT


def test_every_setting_is_in_the_readme() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    missing = [name for name in Settings.model_fields if f"`MNIST_{name.upper()}`" not in readme]
    assert missing == [], f"settings missing from the README's configuration table: {missing}"


def _readme() -> str:
    return " ".join((REPO_ROOT / "README.md").read_text().split())  # lines joined, as read


def test_the_metrics_page_limit_is_the_routes_wherever_the_readme_says_it() -> None:
    readme = _readme()
    said = re.findall(r"default 1000, max ([\d  ,]+)\)", readme)
    said += re.findall(r"≤ ([\d  ,]+) on metrics", readme)
    assert len(said) == 2, f"the README's two statements of the limit were not found: {said}"
    assert {int(re.sub(r"\D", "", n)) for n in said} == {MAX_STEPS_PAGE}, said
    assert f"default {DEFAULT_STEPS_PAGE}, max" in readme
    assert f"`limit` ≤ {MAX_PAGE} on `/jobs`" in readme


def test_the_checkpoint_snippet_loads_a_real_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"<!-- checkpoint-snippet:[^>]*-->\s*```python\n(.*?)```", readme, re.S)
    assert block is not None, "the README's checkpoint snippet is missing"
    trained = SimpleMLP()
    save_checkpoint(trained, tmp_path / "model.pt")  # as a worker writes it
    keys = list(torch.load(tmp_path / "model.pt", weights_only=True))
    named = re.search(r"the keys (`net[^(]*)\(", readme)
    assert named is not None and re.findall(r"`([\w.]+)`", named.group(1)) == keys
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {"__name__": "readme_snippet"}
    exec(compile(block.group(1), "README.md", "exec"), scope)
    model = scope["model"]
    assert isinstance(model, torch.nn.Module) and not model.training
    image = torch.rand(3, 1, 28, 28)
    assert torch.equal(model(image), trained(image))
