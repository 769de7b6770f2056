"""The thread tuner, holding fewer threads than the most, times the counts again once the
cores they leave sit idle, and not while another process keeps those cores busy."""

from __future__ import annotations

import itertools

import pytest

from tests.workers.tuning.fake_cores import Cores, tuner_on
from workers.tuning.threads import LOOK_AFTER_S, MAX_LOOK_WAIT_S, ThreadTuner


def one_thread_held(
    others_share: float = 1.0, runnable: int | None = None
) -> tuple[Cores, ThreadTuner]:
    """One thread chosen (two crawl, as beside a process that holds a core) and held for an
    hour of steps; other processes then use ``others_share`` of a core (:class:`Cores`)."""
    cores = Cores({1: 0.0010, 2: 0.0030}, others_share=others_share, runnable=runnable)
    tuner = tuner_on(cores, recheck_s=3600.0)
    cores.train(tuner, 10)
    assert tuner.threads == 1
    return cores, tuner


def idle_then_loaded(cores: Cores, idle_s: float, loaded_s: float) -> None:
    """The worker waits ``idle_s`` on idle cores, then ``loaded_s`` beside a process."""
    cores.others_share = 0.0
    cores.wait(idle_s)
    cores.others_share = 1.0
    cores.wait(loaded_s)


def run_jobs(cores: Cores, tuner: ThreadTuner, jobs: int, *, steps: int, gap_s: float) -> None:
    """``jobs`` jobs of ``steps`` steps each, the worker waiting ``gap_s`` after each."""
    for _ in range(jobs):
        tuner.begin()
        cores.train(tuner, steps)
        cores.wait(gap_s)


def test_one_thread_chosen_beside_a_load_gives_way_to_two_once_the_load_leaves() -> None:
    # Another process holds a core: two threads crawl, one thread wins and holds.
    cores, tuner = one_thread_held()
    # Jobs of 0.3 s, 0.5 s apart: the load keeps its core through them and between them.
    run_jobs(cores, tuner, 10, steps=300, gap_s=0.5)
    assert cores.changes == [1, 2, 1]
    # It leaves. One thread's steps run as before (it never needed the other core), so only
    # the idle cores can tell; within a few jobs two threads are timed and win.
    cores.others_share, cores.step_s[2] = 0.0, 0.0006
    run_jobs(cores, tuner, 4, steps=300, gap_s=0.5)
    assert tuner.threads == cores.threads == 2
    assert cores.changes == [1, 2, 1, 2]


def test_a_little_load_on_the_other_core_still_lets_the_counts_be_timed() -> None:
    # An API answering polls takes a fifth of a core; the cores left are mostly idle.
    cores, tuner = one_thread_held(0.2)
    cores.step_s[2] = 0.0006  # two threads would now win
    cores.train(tuner, round(2 * LOOK_AFTER_S / 0.0010))
    assert tuner.threads == cores.threads == 2


def looks_at(cores: Cores) -> list[float]:
    """When two threads were set after one: each timing of the counts from one thread held
    (a look times two threads twice where they lose narrowly, :func:`test_each_look...`)."""
    switches = list(zip(cores.switched_at, cores.switches, strict=True))
    return [at for (_, before), (at, n) in itertools.pairwise(switches) if (before, n) == (1, 2)]


def test_each_look_that_fewer_threads_win_again_waits_twice_as_long() -> None:
    # Under light polls two threads lose narrowly, pass after pass: every look times both
    # counts twice and one thread holds again, so the looks grow apart, up to the longest wait.
    cores = Cores({1: 0.0010, 2: 0.0012}, others_share=0.2)
    tuner = tuner_on(cores, recheck_s=3600.0)
    cores.train(tuner, round(34 * LOOK_AFTER_S / 0.0010))
    assert tuner.threads == 1
    # The first choice's two passes, then a look after each wait: 2, 4, 8, 8, 8 of the first.
    starts = looks_at(cores)[2::2]
    assert len(starts) == 6, starts
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    waits = [min(LOOK_AFTER_S * 2**k, MAX_LOOK_WAIT_S) for k in range(1, len(gaps) + 1)]
    for gap, wait in zip(gaps, waits, strict=True):
        assert wait <= gap < wait + 0.1


def test_one_threads_windows_swinging_either_way_wait_for_the_look() -> None:
    # Beside an API answering polls, one thread's windows swing between 0.7 and 1.4 ms a step,
    # past the recheck's factor either way at every window; two threads stall beside the polls.
    # Each swing timed two threads: a few stalled steps every few milliseconds. They wait as
    # any look does, and each that one thread wins again doubles the wait.
    cores = Cores({1: [0.0007] * 4 + [0.0014] * 4, 2: 0.0040}, others_share=0.2, runnable=0)
    tuner = tuner_on(cores, recheck_s=3600.0)
    cores.train(tuner, round(4.0 / 0.00105))
    assert tuner.threads == 1
    looks = looks_at(cores)[1:]  # after the first choice
    gaps = [b - a for a, b in itertools.pairwise(looks)]
    waits = [min(LOOK_AFTER_S * 2**k, MAX_LOOK_WAIT_S) for k in range(1, len(gaps) + 1)]
    # 0.2, 0.6, 1.4 and 3.0 s after the first choice; the next would come at 4.6 s.
    assert len(looks) == 4, looks
    assert all(wait <= gap < wait + 0.1 for gap, wait in zip(gaps, waits, strict=True)), gaps


def looks_grown_apart(share: float = 0.2) -> tuple[Cores, ThreadTuner]:
    """Polls that take ``share`` of a core; two threads lose narrowly look after look, at 1, 3,
    7 and 15 waits: the next look is the longest wait away."""
    cores = Cores({1: 0.0010, 2: 0.0012}, others_share=share)
    tuner = tuner_on(cores, recheck_s=3600.0)
    cores.train(tuner, round(16 * LOOK_AFTER_S / 0.0010))
    return cores, tuner


def two_threads_win_after_long_waits() -> tuple[Cores, ThreadTuner]:
    """Light polls, the looks at the longest wait; then the polls stop and two threads win the
    next look, after that wait."""
    cores, tuner = looks_grown_apart()
    cores.step_s, cores.others_share = {1: 0.0010, 2: 0.0006}, 0.0
    cores.train(tuner, round((MAX_LOOK_WAIT_S + 2 * LOOK_AFTER_S) / 0.0010))
    assert tuner.threads == 2
    return cores, tuner


def test_a_new_count_resets_the_wait_for_the_next_look() -> None:
    cores, tuner = two_threads_win_after_long_waits()
    cores.train(tuner, round(MAX_LOOK_WAIT_S / 0.0006) + 10)  # they hold for a while
    # A process takes a core: two threads crawl, and one thread is chosen, a new count.
    cores.step_s, cores.others_share = {1: 0.0014, 2: 0.0045}, 1.0
    cores.train(tuner, 40)
    assert tuner.threads == 1
    changes = len(cores.changes)
    # It leaves at once: one thread speeds up too little to tell, the idle core tells.
    cores.step_s, cores.others_share = {1: 0.0012, 2: 0.0006}, 0.0
    cores.train(tuner, round((2 * LOOK_AFTER_S + 0.1) / 0.0012))
    assert tuner.threads == 2  # looked within two short waits, not after the long one
    assert len(cores.changes) == changes + 1


def test_two_threads_that_lose_right_after_a_look_keep_the_long_wait() -> None:
    # Two threads won a look in a quiet moment, and stall at once: one thread again, and the
    # next look waits as long as before, not the new count's short wait (else each quiet moment
    # of a load that stays would start the looks over, every few steps apart).
    cores, tuner = two_threads_win_after_long_waits()
    cores.step_s, cores.others_share = {1: 0.0014, 2: 0.0045}, 1.0
    cores.train(tuner, 40)
    assert tuner.threads == 1
    changes = len(cores.changes)
    cores.step_s, cores.others_share = {1: 0.0010, 2: 0.0012}, 0.2  # the light polls again
    cores.train(tuner, round((2 * LOOK_AFTER_S + 0.1) / 0.0010))
    assert len(cores.changes) == changes  # no look within the short waits
    cores.train(tuner, round(MAX_LOOK_WAIT_S / 0.0010))
    assert len(cores.changes) > changes


def test_the_most_threads_losing_a_recheck_start_the_wait_short() -> None:
    # Two threads held a second of steps; at the recheck one thread wins (narrowly, twice):
    # a new count, not the most threads stalling right after a look, so the wait is short.
    cores = Cores({1: 0.0010, 2: 0.0006}, others_share=0.0)
    tuner = tuner_on(cores, recheck_s=1.0)
    cores.train(tuner, round(0.9 / 0.0006))
    assert tuner.threads == 2
    cores.step_s = {1: 0.0007, 2: 0.00075}  # not slow enough to set off a timing of its own
    cores.train(tuner, round(0.2 / 0.0007))
    assert tuner.threads == 1
    chosen_at = cores.switched_at[-1]
    cores.step_s[2] = 0.0004
    cores.train(tuner, round(0.3 / 0.0007))
    assert tuner.threads == cores.threads == 2
    assert cores.switched_at[-1] - chosen_at < 2 * LOOK_AFTER_S


def polls_then(share: float, before: float = 0.3) -> tuple[Cores, ThreadTuner, int]:
    """Polls that take ``before`` of a core: two threads lose look after look, the next look
    1.4 s away; then the polls take ``share`` and two threads would win. Returns how many
    counts were set before."""
    cores, tuner = looks_grown_apart(before)
    changes = len(cores.changes)
    cores.step_s[2], cores.others_share = 0.0006, share
    cores.train(tuner, round((2 * LOOK_AFTER_S + 0.1) / 0.0010))  # 0.5 s: a reading or two
    return cores, tuner, changes


def test_once_the_load_that_kept_one_thread_goes_the_look_does_not_wait() -> None:
    cores, tuner, _ = polls_then(0.0)
    assert tuner.threads == cores.threads == 2


def test_after_two_threads_lose_right_after_a_look_the_load_going_is_still_seen() -> None:
    # Polls take 0.4 of a core; a quiet moment (0.05) lets two threads win a look, and the polls
    # come back at once: one thread again. Then the polls stop: measured against the polls,
    # not against the quiet moment, the look comes within a reading or two.
    cores, tuner, _ = polls_then(0.05, before=0.4)
    assert tuner.threads == 2
    cores.step_s, cores.others_share = {1: 0.0010, 2: 0.0045}, 0.4
    cores.train(tuner, 40)
    assert tuner.threads == 1
    cores.step_s, cores.others_share = {1: 0.0010, 2: 0.0006}, 0.0
    cores.train(tuner, round((2 * LOOK_AFTER_S + 0.1) / 0.0010))
    assert tuner.threads == cores.threads == 2


@pytest.mark.parametrize(
    ("before", "share"),
    [(0.4, 0.25), (0.15, 0.06)],  # not down to half; half, but by less than a tenth of a core
)
def test_a_load_that_eases_a_little_does_not_cut_the_wait(before: float, share: float) -> None:
    cores, _, changes = polls_then(share, before)
    assert len(cores.changes) == changes


def test_without_the_cores_accounting_fewer_threads_hold_until_the_recheck() -> None:
    cores = Cores({1: 0.0010, 2: 0.0030})  # no reading of the others' CPU (macOS, Windows)
    tuner = tuner_on(cores, recheck_s=3.0)
    cores.train(tuner, 10)
    cores.step_s[2] = 0.0006
    run_jobs(cores, tuner, 8, steps=300, gap_s=0.5)  # 2.4 s of steps, 6.4 s of the clock
    assert cores.changes == [1, 2, 1]
    cores.train(tuner, 700)  # past 3 s of steps at one thread: the recheck as always
    assert tuner.threads == 2


def test_a_load_that_began_late_in_the_stretch_is_seen_by_what_is_runnable() -> None:
    # One thread held; the worker waits 0.5 s between jobs, and 0.1 s before the next job a
    # process takes a core. Over the stretch read the cores sat 80% idle; that process is
    # runnable at the reading, and no look is taken beside it.
    cores, tuner = one_thread_held()
    idle_then_loaded(cores, 0.4, 0.1)
    tuner.begin()
    cores.train(tuner, 20)  # a look would time both counts within these steps
    assert cores.changes == [1, 2, 1]
    # A process that is gone by the reading: the look is taken at the job's first steps.
    cores.others_share, cores.step_s[2] = 0.0, 0.0006
    cores.train(tuner, 300)  # the stretch above is judged; the next is idle
    changes = len(cores.changes)
    cores.others_share, cores.step_s[2] = 1.0, 0.0030
    cores.train(tuner, 40)  # two threads crawl: one thread again, chosen for a load
    cores.others_share, cores.step_s[2] = 0.0, 0.0006  # the process leaves; the worker waits
    cores.wait(0.4)
    tuner.begin()
    cores.train(tuner, 20)
    assert tuner.threads == cores.threads == 2
    assert len(cores.changes) > changes


def test_idle_minutes_between_jobs_are_not_read_as_idle_cores() -> None:
    # The worker idles a minute; a process that takes a core (asleep at each reading, say a
    # batch job between its bursts) begins a second before the next job. Read over the minute,
    # the cores sat 98% idle; the stretch is too long to judge, and the next one shows the load.
    cores, tuner = one_thread_held(runnable=0)
    idle_then_loaded(cores, 59.0, 1.0)
    run_jobs(cores, tuner, 5, steps=300, gap_s=0.5)
    assert cores.changes == [1, 2, 1]


def test_a_load_that_leaves_half_a_core_busy_keeps_fewer_threads() -> None:
    cores, tuner = one_thread_held(0.6, runnable=0)
    cores.step_s[2] = 0.0006
    cores.train(tuner, round(10 * LOOK_AFTER_S / 0.0010))
    assert cores.changes == [1, 2, 1]
    cores.others_share = 0.4  # less than half a core: the look
    cores.train(tuner, round(2 * LOOK_AFTER_S / 0.0010))
    assert tuner.threads == cores.threads == 2


def two_of_four_held() -> tuple[Cores, ThreadTuner]:
    """Four cores, two threads chosen (four crawl: a process holds one of the other two)."""
    cores = Cores({1: 0.0010, 2: 0.0006, 4: 0.0030}, others_share=1.0)
    tuner = tuner_on(cores, candidates=(1, 2, 4), recheck_s=3600.0)
    cores.train(tuner, 20)
    assert tuner.threads == 2
    return cores, tuner


def test_on_more_cores_the_next_count_needs_its_cores_idle() -> None:
    cores, tuner = two_of_four_held()
    changes = len(cores.changes)
    cores.step_s[4] = 0.0004  # four threads would win on idle cores: the process keeps a core
    cores.train(tuner, round(10 * LOOK_AFTER_S / 0.0006))
    assert len(cores.changes) == changes
    cores.others_share = 0.0  # it leaves: two cores idle, four threads timed and chosen
    cores.train(tuner, round(2 * LOOK_AFTER_S / 0.0006))
    assert tuner.threads == cores.threads == 4


def test_a_held_count_that_slows_with_fewer_threads_left_is_timed_again_at_once() -> None:
    # Four cores, two threads just chosen; a process takes two cores at once: two threads
    # crawl and one would win. Fewer threads are what the slowdown asks about: no wait.
    cores, tuner = two_of_four_held()
    chosen_at = cores.switched_at[-1]
    cores.step_s, cores.others_share = {1: 0.0010, 2: 0.0030, 4: 0.0090}, 2.0
    cores.train(tuner, 30)
    assert tuner.threads == cores.threads == 1
    assert cores.switched_at[-1] - chosen_at < LOOK_AFTER_S


def test_the_held_count_sped_up_waits_for_the_look() -> None:
    # Light polls: the looks grow apart. Then one thread's steps speed up (the polls slowed):
    # no timing before the wait is over, and one thread holds; a short wait brings none.
    cores, tuner = looks_grown_apart()
    changes = len(cores.changes)
    cores.step_s[1] = 0.0007
    cores.train(tuner, round(4 * LOOK_AFTER_S / 0.0007))
    assert tuner.threads == 1
    assert len(cores.changes) == changes


def test_a_reading_that_fails_once_keeps_the_last() -> None:
    cores, tuner = one_thread_held()
    cores.others_share, cores.step_s[2] = 0.0, 0.0006  # the load leaves...
    share = cores.others_share
    cores.others_share = None  # ...and the next reading fails
    cores.train(tuner, round(1.5 * LOOK_AFTER_S / 0.0010))
    assert tuner.threads == 1
    cores.others_share = share  # readable again: the look is taken at the next
    cores.train(tuner, round(1.5 * LOOK_AFTER_S / 0.0010))
    assert tuner.threads == cores.threads == 2


def test_a_reading_that_cannot_describe_these_cores_stops_the_watch() -> None:
    # Other processes' CPU seconds run backwards: the file counts this process's own CPU
    # somewhere else (a container's view). Read as idle cores it would set off every look.
    cores, tuner = one_thread_held(-1.0, runnable=0)
    cores.step_s[2] = 0.0006
    cores.train(tuner, round(4 * LOOK_AFTER_S / 0.0010))
    # Plausible idle readings from here on: not watched until the next choice.
    cores.others_share = 0.0
    cores.train(tuner, round(10 * LOOK_AFTER_S / 0.0010))
    assert cores.changes == [1, 2, 1]
