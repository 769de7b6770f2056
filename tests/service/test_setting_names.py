"""A name like a setting's, misspelt, is named: pydantic-settings ignores it without a word."""

from __future__ import annotations

import pytest

from service.setting_names import misspelt
from service.settings import Settings, get_settings


def test_a_misspelt_setting_is_named_with_the_one_it_is_likely_meant_as() -> None:
    environ = {
        "MNIST_PROT": "8001",  # served on the default port, silently
        "MNIST_LEASE_SS": "60",
        "MNIST_PORT": "8002",  # a setting
        "MNIST_URL": "http://x",  # the CLI's
        "MNIST_API_KEY": "k" * 20,  # a setting
        "MNIST_TEST_POSTGRES_URL": "postgresql://x",  # the suite's
        "PROT": "1",
    }
    fields = Settings.model_fields
    assert misspelt(environ, fields) == [
        ("MNIST_LEASE_SS", "MNIST_LEASE_S"),
        ("MNIST_PROT", "MNIST_PORT"),
    ]


def test_the_process_settings_say_so_on_stderr(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MNIST_PROT", "8001")
    monkeypatch.delenv("MNIST_PORT", raising=False)
    get_settings.cache_clear()
    try:
        assert get_settings().port == Settings.model_fields["port"].default
    finally:
        get_settings.cache_clear()
    assert (
        "mnist-service: MNIST_PROT is not a setting (ignored): MNIST_PORT?"
        in capsys.readouterr().err
    )
