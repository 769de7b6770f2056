"""Host synchronisations charged to the service's own lines, and the verdict on them."""

from __future__ import annotations

from collections import Counter

import torch

from benchmarks.env import REPO_ROOT
from benchmarks.syncs import Syncs, our_caller, synchronisations


def test_a_line_that_synchronises_every_step_is_reported() -> None:
    per_epoch = Counter({"workers/train.py:62 (evaluate)": 3, "workers/progress.py:179 (flush)": 4})
    assert not Syncs(471, 7, per_epoch).per_step
    per_step = per_epoch + Counter({"workers/train.py:40 (train_step)": 471})
    assert Syncs(471, 7, per_step).per_step
    assert Syncs(471, 7, None).per_step  # not counted: not shown to be met
    text = Syncs(471, 7, per_step).describe()
    assert text.startswith("478 synchronising calls in 471 steps (7 flushes + epochs): ")
    assert text.index("train_step) ×471") < text.index("flush) ×4") < text.index("evaluate) ×3")


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


def test_nothing_is_counted_off_a_card() -> None:
    with synchronisations(torch.device("cpu")) as sites:
        torch.ones(3).sum().item()
    assert sites == Counter()
