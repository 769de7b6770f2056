"""A sweep's dashboard page (service/api/static/sweep.js) in a real browser, against the real API.

The sweep is started before any worker runs, so the page is first seen with every trial queued
— whatever the speed of the machine — and then, once a worker is started, the same page (never
reloaded) fills in by itself: every trial's loss curve and accuracy per epoch, the table ranked
by accuracy, the parallel-coordinates plot. Reuses the browser test's Chromium and its page
fixture (and skips where they are missing); screenshots go to tests/artifacts/.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from service.schemas import JobCreate
from service.store.engines import make_engine, make_sessionmaker
from tests import test_browser
from tests.records import FakeTraining, lapse_leases
from tests.support import api_server, local_env, process, wait_for

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = test_browser.pytestmark
page = test_browser.page  # a Chromium page on `dashboard` (below); fails on any script error

# Four tiny trials (10 steps an epoch on the suite's small data set): their learning rates on a
# log axis, their seeds on a linear one.
BASE = {"epochs": 2, "batch_size": 16, "trainset_size": 64, "testset_size": 100}
GRID = {"learning_rate": [0.001, 0.01], "seed": [0, 1]}
TRIALS = 4
TIMEOUT_S = 120


@pytest.fixture
def service_env(sqlite_url: str, small_mnist: Path, tmp_path: Path) -> dict[str, str]:
    return local_env(sqlite_url, small_mnist, tmp_path, poll_interval_s="0.1")


@pytest.fixture
def dashboard(service_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """The API alone: the test starts the worker when it wants the trials to run."""
    with api_server(service_env, tmp_path / "api.log") as client:
        yield f"{client.base_url}/"


def page_state(page: Page) -> dict[str, Any]:
    """What the sweep page shows: status, table rows (in order), and the charts' data."""
    state: dict[str, Any] = page.evaluate(
        """() => {
            const data = (id) => document.getElementById(id).data || [];
            return {
                status: document.getElementById("sweep-status").textContent,
                live: document.getElementById("sweep-live").textContent,
                rows: [...document.querySelectorAll("#sweep-body tr")].map((r) => ({
                    job: r.dataset.job, status: r.dataset.status, accuracy: r.dataset.accuracy,
                    best: r.classList.contains("best"),
                    href: r.querySelector("a").getAttribute("href"),
                })),
                loss: data("sweep-loss").map((t) => ({name: t.name, x: t.x, y: t.y})),
                accuracy: data("sweep-accuracy").map((t) => t.y.length),
                parcoords: data("sweep-parcoords").map((t) => ({
                    type: t.type, labels: t.dimensions.map((d) => d.label),
                    lines: t.dimensions[0].values.length,
                })),
                parcoordsDrawn: document.querySelectorAll("#sweep-parcoords .parcoords").length,
                samePage: window.samePage === true,
            };
        }"""
    )
    return state


def test_a_sweep_page_fills_in_live_as_its_trials_train(
    page: Page, dashboard: str, service_env: dict[str, str], tmp_path: Path
) -> None:
    client = httpx.Client(base_url=dashboard, timeout=30)
    created = client.post("/sweeps", json={"params": BASE, "grid": GRID})
    assert created.status_code == 202, created.text
    sweep_id = created.json()["id"]
    assert created.headers["location"] == f"/sweeps/{sweep_id}"

    # The home view lists it; its link opens its page.
    page.goto(dashboard)
    link = page.locator(f"#sweeps-body tr[data-sweep='{sweep_id}'] a")
    link.click()
    page.wait_for_url(f"**/#/sweeps/{sweep_id}")

    # No worker yet: every trial is queued, the charts have a trace per trial and no point.
    def queued() -> dict[str, Any] | None:
        state = page_state(page)
        return state if len(state["rows"]) == TRIALS else None

    before = wait_for(queued, timeout_s=TIMEOUT_S, what="the sweep's trials in its table")
    assert before["status"] == "running"
    assert {r["status"] for r in before["rows"]} == {"queued"}
    assert [len(t["x"]) for t in before["loss"]] == [0] * TRIALS
    assert before["parcoords"] == [] and page.is_visible("#sweep-parcoords-empty")
    headers = page.locator("#sweep-head th[scope='col']").all_text_contents()
    assert headers == ["rank", "trial", "status", "epoch", "accuracy", "learning rate", "seed"]
    test_browser.shot(page, "sweep-01-queued")
    page.evaluate("() => { window.samePage = true; }")  # gone if the page were reloaded

    # A worker trains the trials; the page follows by itself until the sweep has ended.
    with process(["-m", "workers"], service_env, tmp_path / "worker.log"):

        def ended() -> dict[str, Any] | None:
            state = page_state(page)
            if state["status"] in ("failed", "cancelled"):  # say why now, not at the deadline
                pytest.fail(f"sweep {sweep_id} {state['status']}; see {tmp_path}/worker.log")
            done = state["status"] == "succeeded" and state["live"] == ""
            return state if done and all(r["accuracy"] for r in state["rows"]) else None

        after = wait_for(ended, timeout_s=TIMEOUT_S, every_s=0.25, what=f"sweep {sweep_id} to end")
    assert after["samePage"]
    sweep = client.get(f"/sweeps/{sweep_id}").json()
    jobs = {t["job_id"]: client.get(f"/jobs/{t['job_id']}").json() for t in sweep["trials"]}

    # The table: every trial, best first (ties in the sweep's order, as the API's `best`).
    order = {t["job_id"]: i for i, t in enumerate(sweep["trials"])}
    ranked = sorted(sweep["trials"], key=lambda t: (-t["accuracy"], order[t["job_id"]]))
    assert [r["job"] for r in after["rows"]] == [t["job_id"] for t in ranked]
    assert [float(r["accuracy"]) for r in after["rows"]] == [t["accuracy"] for t in ranked]
    assert after["rows"][0]["job"] == sweep["best"]["job_id"] and after["rows"][0]["best"]
    assert [r["href"] for r in after["rows"]] == [f"#/jobs/{t['job_id']}" for t in ranked]

    # The loss chart: one trace per trial, every step once, in order (after_step moved on).
    assert len(after["loss"]) == TRIALS
    for trace, trial in zip(after["loss"], sweep["trials"], strict=True):
        assert trace["name"].startswith(f"…{trial['job_id'][-8:]} ")
        assert len(trace["x"]) == jobs[trial["job_id"]]["total_steps"]
        assert trace["x"] == sorted(set(trace["x"]))
    # Accuracy per epoch: one trace per trial, a point per epoch.
    assert after["accuracy"] == [BASE["epochs"]] * TRIALS
    # Parameters against accuracy: an axis per swept parameter, then accuracy; a line per trial.
    assert after["parcoords"] == [
        {"type": "parcoords", "labels": ["learning rate (log)", "seed", "accuracy"], "lines": 4}
    ]
    assert after["parcoordsDrawn"] > 0
    test_browser.shot(page, "sweep-02-succeeded")

    # A trial's row opens its job, whose page links back to the sweep.
    page.click(f"#sweep-body tr[data-job='{sweep['best']['job_id']}'] a")
    page.wait_for_function(
        f"document.getElementById('job-id').textContent === {sweep['best']['job_id']!r}"
    )
    page.click("#job-sweep")
    page.wait_for_url(f"**/#/sweeps/{sweep_id}")
    page.wait_for_selector(f"#sweep-body tr[data-job='{sweep['best']['job_id']}']")
    assert page.is_disabled("#cancel-sweep")


def test_a_sweep_is_cancelled_from_its_page(page: Page, dashboard: str) -> None:
    # No worker: the trials stay queued until the cancel.
    created = httpx.post(f"{dashboard}sweeps", json={"params": BASE, "grid": GRID}, timeout=30)
    sweep_id = created.json()["id"]
    page.goto(f"{dashboard}#/sweeps/{sweep_id}")
    page.wait_for_selector("#sweep-body tr[data-status='queued']")
    page.click("#cancel-sweep")
    page.wait_for_function(
        "document.getElementById('sweep-status').textContent === 'cancelled'"
        " && document.getElementById('sweep-live').textContent === ''"
    )
    statuses = page.eval_on_selector_all(
        "#sweep-body tr", "rows => rows.map(r => r.dataset.status)"
    )
    assert statuses == ["cancelled"] * TRIALS
    assert page.is_disabled("#cancel-sweep") and page.is_visible("#sweep-parcoords-empty")
    test_browser.shot(page, "sweep-03-cancelled")


def test_a_retried_trials_curve_starts_over_with_its_new_run(
    page: Page, dashboard: str, sqlite_url: str
) -> None:
    """The page reads each trial's steps after those drawn: a retry that trained again from
    the first step was drawn as the lost run's steps and nothing after them (or the two runs
    joined into one curve). The steps are written as a worker writes them."""
    created = httpx.post(
        f"{dashboard}sweeps", json={"params": BASE, "grid": {"seed": [7]}}, timeout=30
    )
    sweep_id = created.json()["id"]
    engine = make_engine(sqlite_url)
    training = FakeTraining(make_sessionmaker(engine), JobCreate(**BASE, seed=7))
    training.job_id = created.json()["trials"][0]["job_id"]

    def drawn() -> list[float]:
        state = page_state(page)
        return list(state["loss"][0]["x"]) if state["loss"] else []

    try:
        page.goto(f"{dashboard}#/sweeps/{sweep_id}")
        training.claim()
        training.advance(3)
        wait_for(lambda: len(drawn()) == 3, timeout_s=TIMEOUT_S, what="the first run's steps")
        lapse_leases(training.sessions)  # its worker died; the retry trains from step 1
        training.worker_id = "second"
        training.claim()
        training.advance(2)
        new_run = [training.plan.examples_seen(step) for step in (1, 2)]
        wait_for(lambda: drawn() == new_run, timeout_s=TIMEOUT_S, what="the new run's steps")
    finally:
        engine.dispose()
