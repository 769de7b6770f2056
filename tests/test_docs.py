"""The README documents every setting."""

from __future__ import annotations

from service.settings import Settings
from tests.support import REPO_ROOT


def test_every_setting_is_in_the_readme() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    missing = [name for name in Settings.model_fields if f"`MNIST_{name.upper()}`" not in readme]
    assert missing == [], f"settings missing from the README's configuration table: {missing}"
