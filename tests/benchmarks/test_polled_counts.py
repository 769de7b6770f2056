"""Each thread count's steps left alone and polled, within one loop (benchmarks/polled_counts.py):
the blocks' alternation, the figures drawn from the step times, and a run against a real API."""

from __future__ import annotations

import contextlib
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from benchmarks import polled_counts
from benchmarks.polled_counts import (
    BLOCK_STEPS,
    CountsRound,
    CountsUnderPolls,
    PollsRun,
    count_rows,
    counts_under_polls,
    least_text,
    polling,
    timed_steps,
)
from service.schemas import JobCreate
from tests.support import needs_wrk
from workers.data import Mnist, load_mnist

# 600 images in batches of 64: 10 steps an epoch, the last of 24 images; 30 steps in all.
SMALL_JOB = JobCreate(trainset_size=600, testset_size=200, batch_size=64, epochs=3)


@pytest.fixture
def small_data(small_mnist: Path) -> Mnist:
    return load_mnist(small_mnist, device=torch.device("cpu"), download=False)


@pytest.fixture
def torch_threads() -> Iterator[None]:
    """torch's thread count, put back after the test (seeded tests depend on it)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("torch_threads")
def test_counts_alternate_in_blocks_and_only_comparable_steps_are_timed(
    small_data: Mnist, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_to: list[int] = []
    set_threads = torch.set_num_threads

    def noting(n: int) -> None:
        set_to.append(n)
        set_threads(n)

    monkeypatch.setattr(torch, "set_num_threads", noting)
    times = timed_steps(small_data, SMALL_JOB, (1, 2), seed=0)
    assert set_to == [1, 2]  # steps 0-15, 16-29
    # Untimed: each block's first step (0, 16), each epoch's first (0, 10, 20) and each short
    # batch (9, 19, 29). Timed at one thread: 1-8, 11-15; at two: 17-18, 21-28.
    assert {n: len(t) for n, t in times.items()} == {1: 8 + 5, 2: 2 + 8}
    assert all(t > 0 for ts in times.values() for t in ts)
    assert BLOCK_STEPS == 16


def one_round(quiet: dict[int, float], polled: dict[int, float]) -> CountsRound:
    return CountsRound(
        {n: [s] * 10 for n, s in quiet.items()},
        {n: [s] * 10 for n, s in polled.items()},
        polls_hz=200.0,
    )


def counted(quiet: dict[int, float], polled: dict[int, float], rounds: int = 3) -> CountsUnderPolls:
    return CountsUnderPolls("the API", [one_round(quiet, polled) for _ in range(rounds)])


def test_the_least_the_polls_cost_is_the_best_polled_count_against_the_best_left_alone() -> None:
    # Two threads are faster alone and stall under the polls; one thread hardly notices them.
    steps = counted({1: 1.2e-3, 2: 1.0e-3}, {1: 1.25e-3, 2: 1.3e-3})
    assert steps.slowdown(2) == pytest.approx(0.3)
    assert steps.slowdown(1) == pytest.approx(1.25 / 1.2 - 1)
    # Not one thread's own slowdown (+4%): a job that chose it trains slower left alone too.
    least = steps.least
    assert least.slowdown == pytest.approx(0.25)
    assert least.fastest_polled == Counter({1: 3})
    assert least_text(steps) == "+25.0% (fastest under the polls: 1 thread in 3 of 3 rounds)"
    assert count_rows([steps]) == [
        ["the API", "1 thread", "1,200 µs", "1,250 µs", "+4.2%", "200"],
        ["the API", "2 threads", "1,000 µs", "1,300 µs", "+30.0%", "200"],
    ]


def test_a_round_the_machine_slowed_throughout_does_not_decide() -> None:
    steps = counted({1: 1.2e-3, 2: 1.0e-3}, {1: 1.25e-3, 2: 1.05e-3}, rounds=4)
    # This host now and then runs two threads several times slower for seconds.
    steps.rounds.append(one_round({1: 1.2e-3, 2: 9.0e-3}, {1: 1.25e-3, 2: 1.1e-3}))
    assert steps.mean_s(2, polled=False) == pytest.approx(1.0e-3)
    assert steps.slowdown(2) == pytest.approx(0.05)
    assert steps.least.slowdown == pytest.approx(0.05)
    assert steps.least.fastest_polled == Counter({2: 5})


@pytest.mark.usefixtures("torch_threads")
def test_rounds_alternate_and_each_loop_is_filed_under_what_ran_beside_it(
    small_data: Mnist, monkeypatch: pytest.MonkeyPatch
) -> None:
    polled_now = False
    order: list[bool] = []

    @contextlib.contextmanager
    def polls() -> Iterator[PollsRun]:
        nonlocal polled_now
        polled_now = True
        run = PollsRun()
        try:
            yield run
        finally:
            polled_now = False
            run.answered, run.rate_hz = 40, 199.0

    def fake_steps(
        _data: Mnist, _params: JobCreate, counts: tuple[int, ...], *, seed: int
    ) -> dict[int, list[float]]:
        order.append(polled_now)
        torch.set_num_threads(counts[-1])  # as the real loop leaves it
        return {n: [2.0 if polled_now else 1.0, float(seed)] for n in counts}

    monkeypatch.setattr(polled_counts, "timed_steps", fake_steps)
    torch.set_num_threads(1)
    steps = counts_under_polls(small_data, polls, rounds=3, label="fake", counts=(1, 3))
    assert order == [False, True, True, False, False, True]
    assert [r.quiet for r in steps.rounds] == [{1: [1.0, r], 3: [1.0, r]} for r in (0, 1, 2)]
    assert [r.polled for r in steps.rounds] == [{1: [2.0, r], 3: [2.0, r]} for r in (0, 1, 2)]
    assert steps.polls_hz == 199.0
    assert torch.get_num_threads() == 1  # put back


@pytest.mark.usefixtures("torch_threads")
def test_a_loop_whose_polls_were_not_answered_is_not_counted(
    small_data: Mnist, monkeypatch: pytest.MonkeyPatch
) -> None:
    @contextlib.contextmanager
    def unanswered() -> Iterator[PollsRun]:
        yield PollsRun()

    monkeypatch.setattr(polled_counts, "timed_steps", lambda *_a, **_k: {1: [1.0]})
    with pytest.raises(RuntimeError, match="no poll was answered"):
        counts_under_polls(small_data, unanswered, rounds=1, label="fake", counts=(1,))


@needs_wrk
@pytest.mark.usefixtures("torch_threads")
def test_each_count_is_timed_alone_and_under_a_real_apis_polls(
    api_of_two: tuple[subprocess.Popen[bytes], httpx.Client],
    training_job: str,
    small_data: Mnist,
) -> None:
    url = str(api_of_two[1].base_url)
    steps = counts_under_polls(
        small_data,
        lambda: polling(url, training_job),
        rounds=2,
        label="the API",
        params=SMALL_JOB,
        counts=(1, 2),
    )
    assert len(steps.rounds) == 2
    for r in steps.rounds:
        assert {n: len(t) for n, t in r.quiet.items()} == {1: 13, 2: 10}
        assert {n: len(t) for n, t in r.polled.items()} == {1: 13, 2: 10}
        assert r.polls_hz > 0  # the pollers were answered while the polled loop ran
