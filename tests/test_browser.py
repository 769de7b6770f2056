"""The dashboard in a real browser: headless Chromium (Debian's) driven by Playwright.

Start a job from the form (after the API has refused bad values), watch the chart gain
points while it trains, find its CSV and checkpoint links, draw a digit and get a
prediction, see the default model named once "production" is set, cancel a job. Screenshots go to
tests/artifacts/ (CI keeps them). Skips, saying why, only where Chromium or Playwright is
missing; CI installs both.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from service.schemas import JobCreate
from tests.support import REPO_ROOT, make_small_mnist, wait_for
from tests.test_end_to_end import start_service

if TYPE_CHECKING:
    from playwright.sync_api import Page

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO_ROOT / "tests" / "artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
VIEWPORT = {"width": 1280, "height": 900}
TIMEOUT_MS = 120_000


def _skip_reason() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "browser test: Playwright's Python package is not installed (pip install -e .[dev])"
    if not CHROMIUM.exists():
        return f"browser test: no Chromium at {CHROMIUM} (apt-get install chromium; CI does)"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The official files when CI names them (a drawn 7 then reads as a 7), else generated ones.

    The form submits the API's defaults for the fields the test leaves empty, so the generated
    set holds as many images as those defaults ask for (10,000 and 1,000): the suite's small
    set (640) would fail the form's job ("trainset_size is 10000 but the data set holds only
    640 images"), as on a fresh machine without MNIST_DATA_DIR.
    """
    value = os.environ.get("MNIST_DATA_DIR")
    if value and (Path(value) / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
        return Path(value)
    return make_small_mnist(
        tmp_path_factory.mktemp("form-mnist"),
        train=JobCreate.model_fields["trainset_size"].default,
        test=JobCreate.model_fields["testset_size"].default,
    )


@pytest.fixture
def dashboard(sqlite_url: str, mnist_dir: Path, tmp_path: Path) -> Iterator[str]:
    """The API and one worker; yields the dashboard's URL."""
    data_dir = mnist_dir
    for service in start_service(sqlite_url, data_dir, tmp_path, events_poll_s="0.2"):
        yield f"{service.client.base_url}/"


@pytest.fixture
def page(dashboard: str) -> Iterator[Page]:
    """A Chromium page on the dashboard; fails the test on any script error."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)  # type: ignore[arg-type]
            page.set_default_timeout(TIMEOUT_MS)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(dashboard)
            yield page
        finally:
            browser.close()
    assert errors == [], f"script errors on the page: {errors}"


def shot(page: Page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def chart_points(page: Page) -> tuple[int, int, str]:
    """(loss points, accuracy points, the status shown) on the job page."""
    value: Any = page.evaluate(
        """() => {
            const chart = document.getElementById("chart");
            const data = chart.data || [{x: []}, {x: []}];
            return [data[0].x.length, data[1].x.length,
                    document.getElementById("job-status").textContent];
        }"""
    )
    return int(value[0]), int(value[1]), str(value[2])


def submit_form(page: Page, **fields: str) -> str:
    """Fill the new-job form, submit it, and return the id of the job page it opens."""
    page.goto(page.url.split("#")[0] + "#/")
    for name, value in fields.items():
        page.fill(f"#field-{name}", value)
    page.click("#submit-job")
    page.wait_for_url("**/#/jobs/*")
    return page.url.rsplit("/", 1)[-1]


def test_train_watch_draw_predict_and_cancel(page: Page) -> None:
    started = time.monotonic()
    page.wait_for_selector("#field-epochs")

    # The API validates; its messages land next to the fields they name.
    page.fill("#field-epochs", "0")
    page.fill("#field-learning_rate", "abc")
    page.click("#submit-job")
    page.wait_for_selector(".field.invalid")
    assert page.text_content("#error-epochs") == "Input should be greater than or equal to 1"
    assert page.text_content("#error-learning_rate") == "Input should be a valid number"
    assert page.text_content("#error-batch_size") == ""
    shot(page, "01-form-errors")

    # A job from the form: its page shows the chart filling in while the job runs. Twelve
    # epochs, looked at every 50 ms: four ran in 0.3 s on a fast host, between two looks.
    page.fill("#field-learning_rate", "")
    epochs = 12
    job_id = submit_form(page, epochs=str(epochs), seed="7")
    samples: list[tuple[int, int, str]] = []

    def finished() -> bool:
        samples.append(chart_points(page))
        points, _, status = samples[-1]
        if status == "running" and points > 1:
            shot(page, "02-job-running")  # the last one taken shows the job well under way
        if status in ("failed", "cancelled"):  # say why now, not after the deadline
            pytest.fail(f"job {job_id} {status}: {page.text_content('#job-error')}")
        return status == "succeeded"

    wait_for(
        finished,
        timeout_s=TIMEOUT_MS / 1000,
        every_s=0.05,
        what=f"job {job_id} to succeed on its page",
    )
    step_text = page.text_content("#job-meta div:nth-child(2) dd") or ""
    total_steps = int(step_text.split("/")[1])
    live = [n for n, _, status in samples if status == "running" and 0 < n < total_steps]
    assert live, f"the chart never showed a partly trained job: {samples[:5]}…{samples[-5:]}"
    loss_points, accuracy_points, _ = samples[-1]
    assert (loss_points, accuracy_points) == (total_steps, epochs)
    # Its downloads: every step as CSV, and the weights once it has succeeded.
    page.wait_for_selector("#job-checkpoint")
    assert page.get_attribute("#job-csv", "href") == f"/jobs/{job_id}/metrics.csv"
    assert page.get_attribute("#job-checkpoint", "href") == f"/models/{job_id}/checkpoint"
    csv_text = page.request.get(page.url.split("#")[0] + f"jobs/{job_id}/metrics.csv").text()
    assert len(csv_text.splitlines()) == 1 + total_steps
    checkpoint = page.request.get(page.url.split("#")[0] + f"models/{job_id}/checkpoint")
    assert checkpoint.ok and len(checkpoint.body()) > 0
    shot(page, "03-job-succeeded")

    # Draw a 7 with the mouse; the prediction comes back as ten bars.
    page.goto(page.url.split("#")[0] + "#/")
    # Ids are told apart by their random end (their start is the time, shared by neighbours).
    row_id = page.locator(f"#jobs-body tr[data-job='{job_id}'] code")
    assert row_id.text_content() == f"…{job_id[-8:]}"
    assert row_id.get_attribute("title") == job_id
    page.wait_for_selector(f"#model-select option[value='{job_id}']", state="attached")
    assert page.text_content("#model-select option[value='']") == "latest succeeded job"
    pad = page.locator("#pad").bounding_box()
    assert pad is not None
    x, y = pad["x"], pad["y"]
    page.mouse.move(x + 90, y + 70)
    page.mouse.down()
    page.mouse.move(x + 190, y + 70, steps=10)
    page.mouse.move(x + 125, y + 230, steps=15)
    page.mouse.up()
    page.wait_for_function("document.querySelectorAll('#bars li').length === 10")
    values = page.eval_on_selector_all("#bars li", "els => els.map(e => e.dataset.p)")
    probabilities = [float(v) for v in values]
    digit = int(page.text_content("#digit") or "-1")
    assert abs(sum(probabilities) - 1) < 1e-4
    assert digit == probabilities.index(max(probabilities))
    assert page.get_attribute("#bars li.top", "data-digit") == str(digit)
    assert page.text_content("#predict-model") == f"model: job …{job_id[-8:]}"
    assert page.get_attribute("#predict-model code", "title") == job_id
    shot(page, "04-prediction")

    # With a "production" alias, the default model says so (it is what answers).
    base = page.url.split("#")[0]
    assert page.request.put(f"{base}models/aliases/production", data={"job_id": job_id}).ok
    page.reload()
    label = f"production → …{job_id[-8:]}"
    page.wait_for_function(
        f"document.querySelector(\"#model-select option[value='']\").textContent === {label!r}"
    )
    shot(page, "04b-production-model")

    # A long job from the form, cancelled from its page.
    submit_form(page, epochs="100")
    page.wait_for_function("document.getElementById('job-status').textContent === 'running'")
    page.click("#cancel-job")
    page.wait_for_function("document.getElementById('job-status').textContent === 'cancelled'")
    assert page.is_disabled("#cancel-job")
    assert page.locator("#job-csv").count() == 1
    assert page.locator("#job-checkpoint").count() == 0  # no weights to download
    shot(page, "05-cancelled")
    print(f"browser test took {time.monotonic() - started:.1f} s")
