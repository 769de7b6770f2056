"""Predict on real MNIST test digits, as sent and as people would send them (real data only)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from torchvision.datasets import MNIST

from service.api.app import create_app
from tests.service.api.routes.conftest import REAL_VALIDATION_IMAGES, TrainedModel
from tests.service.images import EXTRA_VARIANTS, VARIANTS, Variant, png

pytestmark = pytest.mark.real_data

BATCH = 100  # images per request (the fixture's settings allow this many)
MIN_SHARE_OF_PLAIN = 0.9  # each variant keeps at least 90% of the plain PNGs' accuracy


@pytest.fixture(scope="module")
def real_client(real_model: TrainedModel) -> Iterator[TestClient]:
    with TestClient(create_app(real_model.settings)) as client:
        yield client


@pytest.fixture(scope="module")
def validation_digits(real_model: TrainedModel) -> tuple[np.ndarray, np.ndarray]:
    """The test images the worker validated on (never trained on), and their labels."""
    test = MNIST(str(real_model.settings.data_dir), train=False, download=False)
    n = REAL_VALIDATION_IMAGES
    return test.data[:n].numpy(), test.targets[:n].numpy()


@pytest.fixture(scope="module")
def plain_accuracy(
    real_client: TestClient,
    real_model: TrainedModel,
    validation_digits: tuple[np.ndarray, np.ndarray],
) -> float:
    """The API's accuracy on the validation digits sent as plain 28×28 grayscale PNGs."""
    images, labels = validation_digits
    return accuracy(real_client, [png(i) for i in images], labels, real_model.job_id)


def accuracy(client: TestClient, images: list[bytes], labels: np.ndarray, job_id: str) -> float:
    """The share of ``images`` the API labels right, sent ``BATCH`` to a request as ``files``."""
    digits: list[int] = []
    for start in range(0, len(images), BATCH):
        files = [("files", (f"{i}", data)) for i, data in enumerate(images[start : start + BATCH])]
        response = client.post("/predict", files=files)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["job_id"] == job_id
        digits.extend(p["digit"] for p in answer["predictions"])
    return float(np.mean(np.asarray(digits) == labels))


def variant_accuracy(
    client: TestClient, digits: tuple[np.ndarray, np.ndarray], variant: Variant, job_id: str
) -> float:
    images, labels = digits
    rng = np.random.default_rng(0)
    return accuracy(client, [variant(image, rng) for image in images], labels, job_id)


def test_plain_pngs_score_the_models_validation_accuracy(
    real_model: TrainedModel, plain_accuracy: float, capsys: pytest.CaptureFixture[str]
) -> None:
    with capsys.disabled():
        print(
            f"\nvalidation accuracy {real_model.accuracy:.4f}; plain PNGs through "
            f"POST /predict {plain_accuracy:.4f} ({REAL_VALIDATION_IMAGES} test images)"
        )
    assert abs(plain_accuracy - real_model.accuracy) <= 0.01


def test_each_variant_keeps_90_percent_of_the_plain_accuracy(
    real_client: TestClient,
    real_model: TrainedModel,
    validation_digits: tuple[np.ndarray, np.ndarray],
    plain_accuracy: float,
    capsys: pytest.CaptureFixture[str],
) -> None:
    plain = plain_accuracy
    scores = {
        name: variant_accuracy(real_client, validation_digits, variant, real_model.job_id)
        for name, variant in {**VARIANTS, **EXTRA_VARIANTS}.items()
    }
    with capsys.disabled():
        print(f"\naccuracy on {REAL_VALIDATION_IMAGES} MNIST test images: plain PNG {plain:.4f}")
        for name, score in scores.items():
            print(f"  {name:18s} {score:.4f}  ({score / plain:.1%} of plain)")
    for name, score in scores.items():
        assert score >= MIN_SHARE_OF_PLAIN * plain, (name, score, plain)
