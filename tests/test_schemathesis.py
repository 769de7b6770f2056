"""The API against its own OpenAPI document: schemathesis generates requests, every check on.

Every operation gets positive and negative cases (schemathesis' coverage and fuzzing phases),
with the full key; the ``ignored_auth`` check also sends each protected one without a key and
with a wrong one. Zero 5xx and full conformance (status codes, headers, bodies) is the bar.
Generation is derandomized, so a run is repeatable.
"""

from __future__ import annotations

import atexit
import io
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from PIL import Image
from pydantic import SecretStr
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.core.parameters import ParameterLocation
from schemathesis.generation.modes import GenerationMode
from schemathesis.transport.serialization import Binary

from service.api.app import create_app
from service.clock import utcnow
from service.schemas import JobCreate
from service.store import job_repo
from service.store.engines import make_engine, make_sessionmaker
from tests.support import SMALL_TEST, SMALL_TRAIN, app_settings
from workers.worker import Worker

FULL_KEY = "fuzz-full-key-0123456789"
READONLY_KEY = "fuzz-readonly-key-0123456789"
EXAMPLES_PER_OPERATION = 25
# A couple of queued jobs fill the queue, so the 429 path is exercised too.
MAX_QUEUED = 3
CALL_TIMEOUT_S = 30
SEED = 6  # the number: any fixed seed makes every run the same

load_all_checks()
ALL_CHECKS = list(CHECKS.get_all())
# A sweep's limits span its fields: its trial count is the product of its grid's lists, each
# trial's steps come from several fields, a distribution's ends must lie in the field's range.
# JSON Schema cannot say so, so a schema-valid sweep may rightly get a 422 naming the field;
# every other check (no 5xx, status codes, bodies, headers, negative data refused) still holds.
SWEEP_CHECKS = [c for c in ALL_CHECKS if c.__name__ != "positive_data_acceptance"]
STATS: dict[str, Any] = {"cases": 0, "statuses": {}, "started": None}


# The app exists at import, because schemathesis parametrizes tests at collection (its lazy,
# fixture-based loader does not work with pytest 9); its database and model are made by the
# fixture below before the first request.
ROOT = Path(tempfile.mkdtemp(prefix="mnist-fuzz-"))
atexit.register(shutil.rmtree, ROOT, ignore_errors=True)
SETTINGS = app_settings(
    f"sqlite:///{ROOT / 'mnist.db'}",
    ROOT,
    api_key=SecretStr(FULL_KEY),
    readonly_api_key=SecretStr(READONLY_KEY),
    max_queued_jobs=MAX_QUEUED,
)
APP = create_app(SETTINGS)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], deterministic=True
)
schema.config.seed = SEED


@pytest.fixture(scope="module", autouse=True)
def report(request: pytest.FixtureRequest) -> Iterator[None]:
    """After the run: how many cases, which statuses, how long (printed with the results)."""
    yield
    if STATS["started"] is None:
        return
    elapsed_s = time.monotonic() - STATS["started"]
    statuses = ", ".join(f"{code}: {n}" for code, n in sorted(STATS["statuses"].items()))
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    assert capture is not None
    with capture.global_and_fixture_disabled():
        print(f"\nschemathesis: {STATS['cases']} cases in {elapsed_s:.1f} s ({statuses})")


@pytest.fixture(scope="module", autouse=True)
def trained_model(sqlite_template: Path, small_mnist: Path) -> None:
    """A migrated database with one succeeded job, so that /predict can answer 200."""
    shutil.copy(sqlite_template, ROOT / "mnist.db")
    train_settings = SETTINGS.model_copy(update={"data_dir": small_mnist})
    engine = make_engine(SETTINGS.database_url)
    sessions = make_sessionmaker(engine)
    with sessions.begin() as session:
        params = JobCreate(epochs=1, trainset_size=SMALL_TRAIN, testset_size=SMALL_TEST, seed=1)
        job_repo.create_job(session, params, max_attempts=1, now=utcnow())
    Worker(train_settings, sessions, show_progress=False).run(max_jobs=1)
    engine.dispose()


def _as_image(data: bytes) -> bytes:
    """The fuzzed bytes as the pixels of a 28×28 grayscale PNG: still fuzzed, now an image."""
    pixels = np.frombuffer((data or b"\x00") * (784 // max(len(data), 1) + 1), np.uint8)[:784]
    buffer = io.BytesIO()
    Image.fromarray(pixels.reshape(28, 28).copy()).save(buffer, format="PNG")
    return buffer.getvalue()


def _make_positive_uploads_images(case: Any) -> None:
    """A positive case's upload becomes an image made of the fuzzed bytes.

    The schema can say "a file" but not "a decodable image", and a positive case must be one
    the API accepts; negative cases keep their garbage. The new body is recorded as the case's
    starting state, not as an edit: schemathesis revalidates an edited component, cannot
    validate bytes, and so would relabel every edited upload (and with it the whole case)
    negative, then expect the API to refuse a valid image.
    """
    meta = case.meta
    if meta is None or meta.generation.mode is not GenerationMode.POSITIVE:
        return
    body = meta.components.get(ParameterLocation.BODY)
    if body is not None and body.mode is not GenerationMode.POSITIVE:
        return  # a negative body stays as generated
    if not isinstance(case.body, dict):
        return
    single, several = case.body.get("file"), case.body.get("files")
    if isinstance(single, str):
        # A new dict: generated cases may share one body, and a negative case must keep its own.
        case.body = {**case.body, "file": _image_upload(single)}
    elif isinstance(several, list) and all(isinstance(f, str) for f in several):
        case.body = {**case.body, "files": [_image_upload(f) for f in several]}
    else:
        return
    # What schemathesis itself does after writing auth and overrides into a generated case
    # (there is no public call for it): the containers as they are now are the baseline.
    case._record_starting_state()


def _image_upload(data: str) -> Binary:
    # Binary is how schemathesis carries file bytes in a string-typed schema slot.
    raw = data.data if isinstance(data, Binary) else data.encode()
    return Binary(_as_image(raw))


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    derandomize=True,
    database=None,  # no replay of examples saved by earlier runs: every run is the same
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_the_api_conforms_to_its_schema(case: Any) -> None:
    if STATS["started"] is None:
        STATS["started"] = time.monotonic()
    _make_positive_uploads_images(case)
    response = case.call_and_validate(
        headers={"Authorization": f"Bearer {FULL_KEY}"},
        checks=SWEEP_CHECKS if (case.method, case.path) == ("POST", "/sweeps") else ALL_CHECKS,
        timeout=CALL_TIMEOUT_S,  # an event stream that never ends is cut, not waited on
    )
    STATS["cases"] += 1
    STATS["statuses"][response.status_code] = STATS["statuses"].get(response.status_code, 0) + 1
    assert response.status_code < 500, response.text
