"""The GPU benchmark's whole script, run on the CPU and small data so that it is known to work
before a lent card's few minutes are spent on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks import gpu
from tests.support import SMALL_TEST, SMALL_TRAIN


def test_the_gpu_benchmark_runs_end_to_end_on_the_cpu(
    small_mnist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MNIST_DATA_DIR", str(small_mnist))
    output = tmp_path / "benchmarks-gpu.md"
    code = gpu.main(
        [
            "--device=cpu",
            "--runs=1",
            f"--output={output}",
            f"--trainset-size={SMALL_TRAIN // 2}",
            f"--testset-size={SMALL_TEST}",
            f"--big-trainset-size={SMALL_TRAIN}",
            "--pack-sizes=1,3",
            "--solo-max=2",
        ]
    )
    assert code == 0
    text = output.read_text()
    assert "## Training on cpu" in text
    for row in ("baseline: the tutorial's loop, 320 images", "worker job, eager steps"):
        assert row in text
    # Every job finished and was timed: no cell of the table is left empty.
    names = ("| baseline:", "| floor:", "| the service's worker job", "| worker job, eager")
    table = [line for line in text.splitlines() if line.startswith(names)]
    assert len(table) == 4
    assert all(line.split("|")[2].strip().endswith(" s") for line in table)
    assert "640 images × 3 epochs:" in text
    assert "not counted on this device" in text
    assert "could not be captured" not in text
    # Sweeps: both pack sizes timed, the larger one's solo side paced from its first 2 trials.
    assert "## Packed trials on cpu" in text
    assert "\n| 1 | " in text and "(paced)" in text.split("\n| 3 | ")[1].split("\n")[0]
    assert "| 3 trials packed ≥ 20× one at a time |" in text
    assert text.count("Written by `python -m benchmarks.gpu --device=cpu --runs=1 --output=") == 1

    # The CPU document quotes this one: its origin, its card and its summary table.
    written, card, *summary = gpu.card_summary(output) or []
    assert written.startswith("Written by `python -m benchmarks.gpu --device=cpu")
    assert card.startswith("- GPU: ")
    assert summary[0] == "| area | goal | measured | verdict |"
    assert len(summary) == 2 + 4
    assert all(row.startswith("| Training on cpu |") for row in summary[2:5])
    assert summary[5].startswith("| Packed trials on cpu |")


def test_without_a_cards_document_there_is_nothing_to_quote(tmp_path: Path) -> None:
    assert gpu.card_summary(tmp_path / "absent.md") is None
    other = tmp_path / "other.md"
    other.write_text("# Something else\n\nno summary here\n")
    assert gpu.card_summary(other) is None


def test_without_a_card_it_says_so_and_measures_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    output = tmp_path / "out.md"
    assert gpu.main([f"--output={output}"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not output.exists()
