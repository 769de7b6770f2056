"""MNIST read once per worker process, before its first claim."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from workers import data
from workers.data import DataUnavailable, load_mnist, preload_mnist

CPU = torch.device("cpu")


def test_a_preloaded_data_set_is_served_without_reading_the_files(
    small_mnist: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(data, "_cache", {})  # a fresh process's
    preload_mnist(small_mnist, device=CPU, download=False)

    def no_reading(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the files were read again")

    monkeypatch.setattr(data, "_read_split", no_reading)
    mnist = load_mnist(small_mnist, device=CPU, download=False)
    assert len(mnist.train.labels) > 0 and len(mnist.test.labels) > 0


def test_data_that_cannot_be_read_yet_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", logger="workers"):
        preload_mnist(tmp_path / "nowhere", device=CPU, download=False)
    assert "could not load MNIST yet" in caplog.text
    assert "MNIST not found under" in caplog.text  # where it looked, and what to set
    with pytest.raises(DataUnavailable) as raised:  # a host's fault: the job goes back
        load_mnist(tmp_path / "nowhere", device=CPU, download=False)
    assert str(raised.value) == "the worker's host could not read the MNIST data"  # no path
    assert "MNIST not found under" in str(raised.value.__cause__)
