"""Identifiers shared by the API, the workers and the command line."""

from __future__ import annotations

import argparse

import pytest
from pydantic import SecretStr, ValidationError

from service.cli.parser import api_key
from service.clock import is_job_id, is_key_text, new_job_id
from service.settings import Settings

PREFIX = "0123456789abcdef"  # long enough for the settings' minimum length
CANDIDATES = [
    "".join(chr(code) for code in range(0x21, 0x7F)),
    " leading",
    "in the middle",
    "tab\there",
    "line\nbreak",
    "delete\x7f",
    "accent-é",
    "ключ-ключ",
    "nul\x00",
]


def test_a_new_job_id_is_a_job_id() -> None:
    assert is_job_id(new_job_id())
    assert not is_job_id(new_job_id().upper()) and not is_job_id("../models") and not is_job_id(7)


def test_key_text_is_printable_ascii_without_spaces() -> None:
    assert is_key_text(CANDIDATES[0])
    assert not any(is_key_text(candidate) for candidate in CANDIDATES[1:])


@pytest.mark.parametrize("candidate", CANDIDATES)
def test_the_settings_and_the_command_line_take_the_same_keys(candidate: str) -> None:
    key = PREFIX + candidate
    try:
        Settings(api_key=SecretStr(key), readonly_api_key=None)
        settings_take = True
    except ValidationError:
        settings_take = False
    try:
        api_key(key)
        cli_takes = True
    except argparse.ArgumentTypeError:
        cli_takes = False
    assert settings_take == cli_takes == is_key_text(key)
