"""Host synchronisations charged to the service's own lines, and the verdict on them."""

from __future__ import annotations

import warnings
from collections import Counter

import torch

from benchmarks.env import REPO_ROOT
from benchmarks.syncs import Syncs, our_caller, synchronisations


def test_a_line_that_synchronises_every_step_is_reported() -> None:
    # 471 steps in 3 epochs: 157 per epoch. Once per job, epoch or flush is far below that.
    per_job = Counter(
        {"workers/training/train.py:84 (train)": 4, "workers/training/train.py:62 (evaluate)": 3}
    )
    assert not Syncs(471, 3, 7, per_job).per_step
    every_step = per_job + Counter({"workers/training/train.py:40 (train_step)": 471})
    assert Syncs(471, 3, 7, every_step).per_step
    one_epoch_of_steps = per_job + Counter({"workers/training/train.py:40 (train_step)": 157})
    assert Syncs(471, 3, 7, one_epoch_of_steps).per_step
    # One epoch, one flush: the model's four copies to the card are still not per step.
    assert not Syncs(157, 1, 2, per_job).per_step
    assert Syncs(471, 3, 7, None).per_step  # not counted: not shown to be met
    text = Syncs(471, 3, 7, every_step).describe()
    assert text.startswith("478 synchronising calls in 471 steps (7 flushes + epochs): ")
    assert text.index("train_step) ×471") < text.index("(train) ×4") < text.index("evaluate) ×3")


def test_a_synchronisation_is_charged_to_the_services_own_line() -> None:
    where: dict[str, str] = {}
    code = "def evaluate():\n    where['site'] = our_caller()\nevaluate()\n"
    fake = REPO_ROOT / "workers" / "fake.py"
    exec(compile(code, str(fake), "exec"), {"our_caller": our_caller, "where": where})
    assert where["site"] == "workers/fake.py:2 (evaluate)"
    # tests/ is not the service's: the innermost caller is named instead.
    outside = our_caller()
    assert outside.startswith("outside the service: benchmarks/test_syncs.py:")
    assert outside.endswith("(test_a_synchronisation_is_charged_to_the_services_own_line)")


def test_synchronisation_warnings_are_counted_and_others_shown_as_before() -> None:
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with synchronisations(torch.device("cpu")) as sites:
            warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)
            warnings.warn("something else", UserWarning, stacklevel=1)
    assert [str(w.message) for w in shown] == ["something else"]
    [(site, count)] = sites.items()
    assert count == 1
    assert site.startswith("outside the service: benchmarks/test_syncs.py:")
