"""The thread tuner: it times steps at each count, keeps the fastest, and checks again later;
a seeded job records the same losses however often it switches."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from sqlalchemy.orm import Session, sessionmaker

from service.schemas import JobCreate
from service.settings import Settings
from service.status import JobStatus
from service.store import metric_repo
from tests.jobs import queue_job, read_job
from tests.support import SMALL_TEST, SMALL_TRAIN
from tests.workers.reports import Recorder
from tests.workers.tuning.fake_cores import Cores, tuner_on
from workers.data import load_mnist
from workers.training.packing import PackedJob, train_packed
from workers.training.train import train
from workers.tuning.same_bits import same_bits_counts
from workers.tuning.threads import (
    ABANDON_AFTER,
    LOOK_AFTER_S,
    MAX_UNTIMED_STEPS,
    ThreadTuner,
    candidate_threads,
    process_tuner,
    typical_step_s,
)
from workers.worker import Worker

CPU = torch.device("cpu")

# MKL's strict mode gives a matrix product the same bits at any thread count only with MKL and
# its AVX2 or AVX-512 code (the package turns it on, see workers/__init__.py).
strict_mkl = pytest.mark.skipif(
    not torch.backends.mkl.is_available()  # type: ignore[no-untyped-call]
    or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
    reason="MKL's strict reproducible mode needs MKL and AVX2 or AVX-512",
)


@pytest.mark.parametrize(
    ("cores", "expected"),
    [(1, (1,)), (2, (1, 2)), (4, (1, 2, 4)), (6, (1, 2, 4, 6)), (64, (1, 2, 4, 8))],
)
def test_the_candidates_are_powers_of_two_up_to_the_cores(
    cores: int, expected: tuple[int, ...]
) -> None:
    assert candidate_threads(cores) == expected


def test_the_faster_count_is_kept_until_the_next_check() -> None:
    cores = Cores({1: 0.0010, 2: 0.0006})  # two idle cores: two threads win
    tuner = tuner_on(cores)
    cores.train(tuner, 12)  # 1 untimed + 4 timed at each count, then the choice
    assert tuner.threads == cores.threads == 2
    assert cores.switches == [1, 2]
    cores.train(tuner, 100)  # 60 ms: well within the hold
    assert cores.switches == [1, 2]

    cores.step_s[2] = 0.0050  # another process takes a core: two threads collapse
    cores.train(tuner, 300)  # past the hold: timed again, one thread now wins
    assert tuner.threads == cores.threads == 1
    assert cores.switches[-1] == 1


def test_a_held_count_that_slows_down_is_timed_again_at_once() -> None:
    cores = Cores({1: 0.0010, 2: 0.0006})
    tuner = tuner_on(cores, recheck_s=3600.0)
    cores.train(tuner, 12)
    assert tuner.threads == 2
    cores.step_s[2] = 0.0007  # a little slower: not worth a check
    cores.train(tuner, 40)
    assert cores.switches == [1, 2]
    cores.step_s[2] = 0.0030  # much slower, long before the hour is up
    cores.train(tuner, 20)
    assert tuner.threads == cores.threads == 1


def test_fewer_threads_held_under_load_are_timed_again_once_the_load_lifts() -> None:
    cores = Cores({1: 0.0012, 2: 0.0020})  # another process holds a core: one thread wins
    tuner = tuner_on(cores, recheck_s=3600.0)
    cores.train(tuner, 2 * 10)  # twice (1 untimed + 4 timed at each count): fewer threads
    assert tuner.threads == 1
    cores.step_s = {1: 0.00115, 2: 0.0019}  # a little faster: not worth a check
    cores.train(tuner, 40)
    assert cores.switches == [1, 2, 1, 2, 1]
    cores.step_s = {1: 0.0008, 2: 0.0006}  # the load is gone, long before the hour is up
    chosen_at = cores.switched_at[-1]
    while cores.now < chosen_at + LOOK_AFTER_S:
        cores.train(tuner, 1)
    assert tuner.threads == 1  # not within the wait after the choice (a load may stay)
    cores.train(tuner, 4 + 1 + 4 + 3)  # a window past it, then two threads timed
    assert tuner.threads == cores.threads == 2
    assert cores.switches == [1, 2, 1, 2, 1, 2]


def test_fewer_threads_that_win_a_pass_are_timed_again_before_they_hold() -> None:
    # Two threads run a step in 0.6 ms, one in 1.0 ms; but the first window at two threads
    # came right after the worker idled (its second core waking): 2.0 ms a step.
    cores = Cores({1: 0.0010, 2: 0.0020})
    tuner = tuner_on(cores, recheck_s=3600.0)
    cores.train(tuner, 10)  # one pass: one thread won it...
    assert cores.switches == [1, 2, 1]  # ...and the counts are timed again
    cores.step_s[2] = 0.0006
    cores.train(tuner, 10)
    assert tuner.threads == cores.threads == 2  # two won the second pass: they hold
    cores.train(tuner, 200)
    assert cores.switches == [1, 2, 1, 2]
    # Under a load that lasts, one thread wins both passes and holds.
    cores = Cores({1: 0.0010, 2: 0.0019})
    tuner = tuner_on(cores, recheck_s=3600.0)
    cores.train(tuner, 2 * 10 + 200)
    assert tuner.threads == cores.threads == 1
    assert cores.switches == [1, 2, 1, 2, 1]


def test_the_count_whose_faster_pass_is_fastest_holds() -> None:
    # One thread: 1.0 ms, then 1.3 ms (something passed); two threads: 1.5 ms, then 1.2 ms.
    # Two threads won the second pass, but one thread's better pass is better than theirs.
    cores = Cores({1: 0.0010, 2: 0.0015})
    tuner = tuner_on(cores, recheck_s=3600.0)
    cores.train(tuner, 10)
    cores.step_s = {1: 0.0013, 2: 0.0012}
    cores.train(tuner, 10)
    assert tuner.threads == cores.threads == 1
    assert cores.switches == [1, 2, 1, 2, 1]


def test_fewer_threads_that_win_by_a_load_hold_at_once() -> None:
    # Two threads run more than twice slower: another process holds a core, not a moment's
    # blip. One thread holds after one pass, without looking at two threads again.
    cores = Cores({1: 0.0010, 2: 0.0030})
    tuner = tuner_on(cores, recheck_s=3600.0)
    cores.train(tuner, 10 + 200)
    assert tuner.threads == cores.threads == 1
    assert cores.switches == [1, 2, 1]


def test_a_held_count_that_slows_is_timed_again_in_two_passes_when_it_loses_narrowly() -> None:
    cores = Cores({1: 0.0010, 2: 0.0006})
    tuner = tuner_on(cores, recheck_s=3600.0)
    cores.train(tuner, 10)
    assert cores.switches == [1, 2]
    cores.step_s[2] = 0.0013  # 1.3x and more slower: timed again; one thread wins narrowly
    cores.train(tuner, 4 + 5)  # the held count's window, then one thread's: it won a pass
    assert cores.switches == [1, 2, 1]
    cores.step_s[2] = 0.0006  # two threads are back to what they ran
    cores.train(tuner, 5 + 5 + 100)  # the second pass: without it one thread held the hour
    assert tuner.threads == cores.threads == 2
    assert cores.switches == [1, 2, 1, 2]


def test_the_most_threads_running_faster_are_not_timed_again() -> None:
    cores = Cores({1: 0.0010, 2: 0.0008})
    tuner = tuner_on(cores, recheck_s=3600.0)
    cores.train(tuner, 12)
    assert tuner.threads == 2
    cores.step_s = {1: 0.0008, 2: 0.0005}  # faster still: one thread cannot win more now
    cores.train(tuner, 40)
    assert cores.switches == [1, 2]


def test_a_count_far_slower_than_the_fastest_is_not_timed_to_the_end() -> None:
    cores = Cores({1: 0.0010, 2: 0.0150})  # another process holds a core: two threads crawl
    tuner = tuner_on(cores, probe_steps=16)
    cores.train(tuner, 17)  # count 1: 1 untimed + 16 timed
    assert cores.switches == [1, 2]
    cores.train(tuner, 1 + ABANDON_AFTER)  # count 2: 1 untimed + the few that condemn it
    assert tuner.threads == cores.threads == 1
    assert cores.switches == [1, 2, 1]


def test_a_choice_holds_for_seconds_of_training_not_of_waiting() -> None:
    cores = Cores({1: 0.0010, 2: 0.0006})
    tuner = tuner_on(cores)  # holds for 1 s
    cores.train(tuner, 12)
    assert cores.switches == [1, 2]
    for _ in range(10):  # jobs of 30 ms of steps, 10 s apart: the worker waits between them
        cores.now += 10.0
        tuner.begin()
        cores.train(tuner, 50)
    assert set(cores.switches[2:]) == {2}  # begin applies the count; no second probe
    cores.train(tuner, 2000)  # 1.2 s of steps: timed again
    assert 1 in cores.switches[2:]


def test_what_is_not_a_step_is_not_timed() -> None:
    cores = Cores({1: 0.0010, 2: 0.0006})
    tuner = tuner_on(cores)
    cores.train(tuner, 6)  # count 1 timed; count 2 begins
    for _ in range(3):
        cores.now += 0.5  # a flush, an evaluation: far longer than a step
        tuner.resume_timing()
        cores.train(tuner, 2)
    assert tuner.threads == 2


def test_steps_beside_the_workers_own_writes_do_not_decide_for_long() -> None:
    cores = Cores({1: 0.0010, 2: 0.0006})
    tuner = tuner_on(cores, recheck_s=3600.0)
    cores.train(tuner, 12)
    assert cores.switches == [1, 2]
    cores.step_s[2] = 0.0030  # a write takes a core: two threads stall while it runs
    for _ in range(3):  # three writes of 20 steps each, apart
        cores.train(tuner, 20, beside_writes=True)
        cores.step_s[2] = 0.0006
        cores.train(tuner, 10)
        cores.step_s[2] = 0.0030
    assert cores.switches == [1, 2]  # neither timed again nor switched
    # A write that never ends (a database gone quiet) does not freeze the choice.
    cores.train(tuner, MAX_UNTIMED_STEPS + 10, beside_writes=True)
    assert tuner.threads == cores.threads == 1


def test_a_slow_step_among_fast_ones_does_not_decide() -> None:
    cores = Cores({1: 0.0010, 2: 0.0006})
    tuner = tuner_on(cores)
    cores.train(tuner, 7)
    cores.now += 0.1  # one step of count 2 is slow (the OS ran something else)
    cores.train(tuner, 5)
    assert tuner.threads == 2  # the slowest timed step is left out of the count's time


def test_stalls_that_recur_count_against_the_count_they_stall() -> None:
    # Another process wakes every few milliseconds (an API answering polls): at two threads
    # one step in three waits for the core it took; one thread is steady. The median step
    # favours two threads (0.6 ms against 0.8 ms); what a job takes favours one.
    cores = Cores({1: 0.0008, 2: [0.0006, 0.0006, 0.0030]})
    tuner = tuner_on(cores, probe_steps=12)
    cores.train(tuner, 2 * (12 + 1))  # one pass: one thread won it
    cores.train(tuner, 2 * (12 + 1) + 100)  # and the second: it holds
    assert tuner.threads == cores.threads == 1
    assert cores.switches == [1, 2, 1, 2, 1]


def test_the_typical_step_leaves_out_the_slowest_few() -> None:
    assert typical_step_s([1.0, 1.0, 1.0, 9.0]) == 1.0  # one of four: left out
    assert typical_step_s([1.0] * 14 + [9.0, 9.0]) == 1.0  # two of sixteen
    assert typical_step_s([1.0] * 13 + [9.0] * 3) == pytest.approx((13 + 9) / 14)
    assert typical_step_s([2.0]) == 2.0


def test_begin_applies_the_count_whatever_set_torch_meanwhile() -> None:
    cores = Cores({1: 0.0010, 2: 0.0006})
    tuner = tuner_on(cores)
    cores.train(tuner, 12)
    cores.threads = 1  # e.g. a benchmark's floor run in the same process
    tuner.begin()
    assert cores.threads == 2


def test_one_core_has_nothing_to_choose() -> None:
    cores = Cores({1: 0.001})
    tuner = tuner_on(cores, candidates=(1,))
    cores.train(tuner, 10_000)
    assert cores.switches == [1]


class Counting(ThreadTuner):
    """A tuner that notes each step it is told of ("step") and each timing begun ("begin")."""

    def __init__(self, candidates: tuple[int, ...], probe_steps: int) -> None:
        super().__init__(candidates, probe_steps=probe_steps)
        self.told: list[str] = []

    def step(self, *, beside_writes: bool = False) -> None:
        self.told.append("beside writes" if beside_writes else "step")
        super().step(beside_writes=beside_writes)

    def begin(self) -> None:
        self.told.append("begin")
        super().begin()


@pytest.fixture
def counting_tuner(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counting]:
    """A :class:`Counting` tuner as the workers' process tuner; torch's count put back after."""
    tuner = Counting(candidate_threads(2), probe_steps=3)
    monkeypatch.setattr("workers.worker.process_tuner", lambda: tuner)
    threads_before = torch.get_num_threads()
    yield tuner
    torch.set_num_threads(threads_before)


def test_a_worker_on_auto_reports_every_step_to_its_tuner(
    settings: Settings, sessions: sessionmaker[Session], counting_tuner: Counting
) -> None:
    tuner, told = counting_tuner, counting_tuner.told
    job_id = queue_job(
        sessions, {"trainset_size": SMALL_TRAIN, "testset_size": SMALL_TEST, "epochs": 2}
    )
    Worker(settings, sessions, show_progress=False).run(max_jobs=1)
    job = read_job(sessions, job_id)
    assert job.status == JobStatus.SUCCEEDED, job.error
    # Each epoch's first step begins the timing (it follows setup or evaluation); the rest
    # are told of, timed or (beside the worker's writes) not.
    assert told.count("begin") == 2
    assert told.count("step") + told.count("beside writes") == job.total_steps - 2
    assert tuner.threads in (1, 2)


def test_a_jobs_log_line_says_how_many_steps_ran_at_each_count(
    settings: Settings,
    sessions: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    held: list[int] = []

    class Noting(ThreadTuner):
        """Notes the count that held during each step, as the step is told of."""

        def step(self, *, beside_writes: bool = False) -> None:
            held.append(self.threads)
            super().step(beside_writes=beside_writes)

        def begin(self) -> None:
            held.append(self.threads)
            super().begin()

    # Timed again after every choice: the job's steps run at both counts.
    tuner = Noting(candidate_threads(2), probe_steps=2, recheck_s=0.0)
    monkeypatch.setattr("workers.worker.process_tuner", lambda: tuner)
    job_id = queue_job(
        sessions, {"trainset_size": SMALL_TRAIN, "testset_size": SMALL_TEST, "epochs": 2}
    )
    threads_before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="workers"):
            Worker(settings, sessions, show_progress=False).run(max_jobs=1)
    finally:
        torch.set_num_threads(threads_before)
    assert read_job(sessions, job_id).status == JobStatus.SUCCEEDED
    ended = [m for m in caplog.messages if m.startswith(f"job {job_id} succeeded")]
    tally = ", ".join(f"{n}: {held.count(n)}" for n in sorted(set(held)))
    assert ended == [f"job {job_id} succeeded; steps by thread count: {tally}"]
    assert len(held) == read_job(sessions, job_id).total_steps
    assert set(held) == {1, 2}


def test_the_process_has_one_tuner() -> None:
    assert process_tuner() is process_tuner()


def test_a_count_that_trains_to_other_bits_is_not_a_candidate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Two threads sum in another order than one (as MKL does outside its strict mode); four
    # happen to agree with one.
    def bits(batch_size: int) -> list[torch.Tensor]:
        threads = torch.get_num_threads()
        return [torch.tensor([float(batch_size), 0.5 if threads == 2 else 0.25])]

    monkeypatch.setattr("workers.tuning.same_bits.training_bits", bits)
    threads_before = torch.get_num_threads()
    assert same_bits_counts((1, 2, 4)) == (1, 4)
    assert same_bits_counts((1,)) == (1,)
    assert torch.get_num_threads() == threads_before


@strict_mkl
def test_on_this_cpu_every_count_trains_to_one_threads_bits() -> None:
    assert same_bits_counts((1, 2, 3, 4)) == (1, 2, 3, 4)


class Switching(Recorder):
    """Ticks a tuner at every step, as the worker's reporter does, and notes each step's count."""

    def __init__(self, tuner: ThreadTuner) -> None:
        super().__init__()
        self.tuner = tuner
        self.threads: list[int] = []

    def step(self, loss: torch.Tensor) -> None:
        self.threads.append(torch.get_num_threads())
        super().step(loss)
        self.tuner.step()


def switches(threads: list[int]) -> int:
    return sum(a != b for a, b in itertools.pairwise(threads))


def restless_tuner() -> ThreadTuner:
    """The process tuner's candidates on two cores, timed again after every choice: the count
    changes every few steps, whichever is faster."""
    return ThreadTuner(same_bits_counts(candidate_threads(2)), probe_steps=4, recheck_s=0.0)


@strict_mkl
def test_switching_counts_mid_job_trains_as_one_thread_bit_for_bit(small_mnist: Path) -> None:
    data = load_mnist(small_mnist, device=torch.device("cpu"), download=False)
    params = JobCreate(epochs=8, batch_size=16, trainset_size=SMALL_TRAIN, testset_size=SMALL_TEST)
    threads_before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = Recorder()
        one_model = train(params, data, torch.device("cpu"), seed=5, report=one)
        switching = Switching(restless_tuner())
        switching_model = train(params, data, torch.device("cpu"), seed=5, report=switching)
    finally:
        torch.set_num_threads(threads_before)
    assert len(one.losses) == 320  # 8 epochs of 40 batches: many probes of both counts
    assert switches(switching.threads) >= 40
    assert min(switching.threads.count(n) for n in (1, 2)) >= 80
    assert switching.losses == one.losses
    assert switching.accuracies == one.accuracies
    for a, b in zip(switching_model.parameters(), one_model.parameters(), strict=True):
        assert torch.equal(a, b)


@strict_mkl
def test_a_seeded_job_records_the_same_losses_under_auto_as_on_one_thread(
    settings: Settings, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    counts: list[int] = []

    class Noting(ThreadTuner):
        def step(self, *, beside_writes: bool = False) -> None:
            counts.append(torch.get_num_threads())
            super().step()  # every step timed: switching as often as it can is the point

    tuner = Noting(same_bits_counts(candidate_threads(2)), probe_steps=4, recheck_s=0.0)
    monkeypatch.setattr("workers.worker.process_tuner", lambda: tuner)
    params = {"trainset_size": SMALL_TRAIN, "testset_size": SMALL_TEST, "epochs": 5}
    params |= {"batch_size": 16, "seed": 9}
    auto, one = queue_job(sessions, params), queue_job(sessions, params)
    threads_before = torch.get_num_threads()
    try:
        Worker(settings, sessions, show_progress=False).run(max_jobs=1)
        fixed = settings.model_copy(update={"torch_threads": 1})
        Worker(fixed, sessions, show_progress=False).run(max_jobs=1)
    finally:
        torch.set_num_threads(threads_before)
    with sessions() as session:
        losses = [
            [s["loss"] for s in metric_repo.read_steps(session, i, after_step=0, limit=1000)]
            for i in (auto, one)
        ]
    assert {read_job(sessions, i).status for i in (auto, one)} == {JobStatus.SUCCEEDED}
    assert len(losses[0]) == 5 * SMALL_TRAIN // 16
    assert switches(counts) >= 20
    assert min(counts.count(n) for n in (1, 2)) >= 50
    assert losses[0] == losses[1]


@strict_mkl
def test_switching_counts_mid_pack_trains_as_one_thread_bit_for_bit(small_mnist: Path) -> None:
    data = load_mnist(small_mnist, device=torch.device("cpu"), download=False)
    params = JobCreate(epochs=6, batch_size=16, trainset_size=SMALL_TRAIN, testset_size=SMALL_TEST)
    trials = [params.model_copy(update={"learning_rate": lr}) for lr in (1e-3, 2e-3, 5e-3)]
    threads_before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [Recorder() for _ in trials]
        train_packed([PackedJob(p, 7 + i, one[i]) for i, p in enumerate(trials)], data, CPU)
        # As the worker does: the pack's first job's reporter ticks the tuner at every step.
        first = Switching(restless_tuner())
        switching = [first, Recorder(), Recorder()]
        train_packed([PackedJob(p, 7 + i, switching[i]) for i, p in enumerate(trials)], data, CPU)
    finally:
        torch.set_num_threads(threads_before)
    threads = first.threads
    assert len(threads) == 240 and switches(threads) >= 30
    assert min(threads.count(n) for n in (1, 2)) >= 60
    for a, b in zip(switching, one, strict=True):
        assert a.losses == b.losses
        assert a.accuracies == b.accuracies


def test_a_packing_worker_tells_its_tuner_each_pack_step_once(
    settings: Settings, sessions: sessionmaker[Session], counting_tuner: Counting
) -> None:
    told = counting_tuner.told
    params = {"trainset_size": SMALL_TRAIN, "testset_size": SMALL_TEST, "epochs": 2}
    jobs = [queue_job(sessions, {**params, "learning_rate": lr}) for lr in (1e-3, 2e-3, 3e-3)]
    packing = settings.model_copy(update={"pack_max": 3})
    Worker(packing, sessions, show_progress=False).run(max_jobs=3)
    done = [read_job(sessions, j) for j in jobs]
    assert [j.status for j in done] == [JobStatus.SUCCEEDED] * 3, [j.error for j in done]
    # One pack: its steps are timed once, as one job's would be, not once per job.
    assert len(told) == done[0].total_steps
    assert told.count("begin") == 2
