"""Image bytes → the tensor the model sees; the model cache; predictions over a batch."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import torch
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker
from torchvision.datasets import MNIST

from service.clock import utcnow
from service.errors import Conflict, InvalidInput, PayloadTooLarge, UnsupportedMediaType
from service.ml import SimpleMLP, load_model, save_checkpoint
from service.schemas import JobCreate, Prediction
from service.serving.batching import ForwardBatcher
from service.serving.predictor import ModelCache, Predictor, image_to_tensor, images_to_tensor
from service.serving.registry import ModelChoice, ResolutionCache
from service.status import JobStatus
from service.store import job_repo
from tests.service.images import TUTORIAL, encode, png_claiming_size
from tests.support import synthetic_digits, wait_for


def test_a_28x28_mnist_png_gives_exactly_the_tutorial_tensor(small_mnist: Path) -> None:
    dataset = MNIST(str(small_mnist), train=False, download=False)
    for i in range(20):
        image, _ = dataset[i]
        got = image_to_tensor(encode(image))
        assert got.shape == (1, 1, 28, 28)
        assert torch.equal(got[0], TUTORIAL(image))


def test_colour_and_size_are_brought_to_28x28_grayscale() -> None:
    rgb = Image.new("RGB", (280, 140), (255, 0, 0))
    rgba = Image.new("RGBA", (30, 30), (0, 0, 0, 0))
    for image, fmt in ((rgb, "JPEG"), (rgb, "PNG"), (rgba, "PNG"), (rgb, "BMP"), (rgb, "GIF")):
        x = image_to_tensor(encode(image, fmt))
        assert x.shape == (1, 1, 28, 28) and x.dtype == torch.float32


# 6000×6000 is above Pillow's warning threshold (the service lowers it): refused all the same.
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_empty_garbage_truncated_and_huge_inputs_are_refused() -> None:
    with pytest.raises(InvalidInput, match="empty"):
        image_to_tensor(b"")
    with pytest.raises(UnsupportedMediaType, match="not an image"):
        image_to_tensor(b"this is plainly text, not a picture")
    png = encode(
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    )
    with pytest.raises(InvalidInput, match="truncated or corrupt"):
        image_to_tensor(png[: len(png) // 2])
    for side in (6_000, 20_000):  # above our cap; above Pillow's own bomb threshold
        bomb = png_claiming_size(side, side)
        assert len(bomb) < 100
        with pytest.raises(PayloadTooLarge, match="pixels"):
            image_to_tensor(bomb)


# --- the model cache -------------------------------------------------------------------------

JOIN_S = 30.0


def save(tmp_path: Path, name: str, seed: int) -> SimpleMLP:
    torch.manual_seed(seed)
    model = SimpleMLP()
    save_checkpoint(model, tmp_path / name)
    return model


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def run_threads(
    targets: list[Callable[[], object]], *, meanwhile: Callable[[], object] = lambda: None
) -> None:
    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    meanwhile()
    for t in threads:
        t.join(timeout=JOIN_S)
        assert not t.is_alive(), "a thread is stuck"


def release_when_all_wait(
    cache: ModelCache, checkpoint: str, waiters: int, release: threading.Event
) -> Callable[[], None]:
    """Let the load finish once the other callers all wait for it (no sleeping on a hunch)."""

    def check() -> None:
        wait_for(
            lambda: cache.waiting(checkpoint) == waiters,
            timeout_s=JOIN_S,
            what=f"{waiters} callers waiting for the load",
            every_s=0.01,
        )
        release.set()

    return check


def test_the_cache_keeps_the_most_recently_used_models(tmp_path: Path) -> None:
    for i in range(3):
        save(tmp_path, f"m{i}.pt", seed=i)
    cache = ModelCache(tmp_path, capacity=2)
    m0 = cache.get("m0.pt")
    cache.get("m1.pt")
    assert cache.get("m0.pt") is m0  # a hit: m0 is now the most recent
    cache.get("m2.pt")  # evicts m1, the least recently used
    assert len(cache) == 2 and cache.loads == 3
    assert cache.get("m0.pt") is m0 and cache.loads == 3
    cache.get("m1.pt")
    assert cache.loads == 4


def test_concurrent_requests_load_a_checkpoint_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved = save(tmp_path, "m.pt", seed=1)
    callers = 8
    disk_reads: list[str] = []
    release = threading.Event()

    def slow_load(path: Path, device: str = "cpu") -> SimpleMLP:
        disk_reads.append(path.name)
        assert release.wait(JOIN_S)  # until every other caller waits for this load
        return load_model(path, device)

    monkeypatch.setattr("service.serving.predictor.load_model", slow_load)
    cache = ModelCache(tmp_path, capacity=4)
    got: list[SimpleMLP] = []

    def ask() -> None:
        got.append(cache.get("m.pt"))

    run_threads(
        [ask] * callers, meanwhile=release_when_all_wait(cache, "m.pt", callers - 1, release)
    )
    assert disk_reads == ["m.pt"] and cache.loads == 1
    assert len(got) == callers and all(m is got[0] for m in got)
    assert same_weights(got[0], saved)


def test_loading_one_checkpoint_does_not_hold_up_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save(tmp_path, "slow.pt", seed=1)
    save(tmp_path, "fast.pt", seed=2)
    fast_loaded = threading.Event()

    def load(path: Path, device: str = "cpu") -> SimpleMLP:
        # The slow load finishes only once the fast one has: under one global lock held across
        # loads, the fast one would wait for the slow one and this would time out.
        if path.name == "slow.pt":
            assert fast_loaded.wait(JOIN_S), "the fast load waited for the slow one"
        return load_model(path, device)

    monkeypatch.setattr("service.serving.predictor.load_model", load)
    cache = ModelCache(tmp_path, capacity=4)

    def fast() -> None:
        cache.get("fast.pt")
        fast_loaded.set()

    run_threads([lambda: cache.get("slow.pt"), fast])
    assert cache.loads == 2


def test_a_failed_load_reaches_every_waiter_and_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save(tmp_path, "m.pt", seed=1)
    callers = 4
    attempts: list[int] = []
    release = threading.Event()

    def failing(path: Path, device: str = "cpu") -> SimpleMLP:
        attempts.append(1)
        assert release.wait(JOIN_S)  # until every other caller waits for this load
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("service.serving.predictor.load_model", failing)
    cache = ModelCache(tmp_path, capacity=4)
    errors: list[str] = []

    def ask() -> None:
        try:
            cache.get("m.pt")
        except Conflict as exc:
            errors.append(exc.message)

    run_threads(
        [ask] * callers, meanwhile=release_when_all_wait(cache, "m.pt", callers - 1, release)
    )
    assert len(attempts) == 1 and len(errors) == callers
    assert all("cannot be loaded: disk on fire" in e for e in errors)
    monkeypatch.setattr("service.serving.predictor.load_model", load_model)
    cache.get("m.pt")  # not remembered as failed
    assert cache.loads == 1


def test_a_half_written_checkpoint_is_never_served(tmp_path: Path) -> None:
    model = save(tmp_path, "whole.pt", seed=3)
    whole = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "m.pt").write_bytes(whole[: len(whole) // 2])
    cache = ModelCache(tmp_path, capacity=2)
    with pytest.raises(Conflict, match="cannot be loaded"):
        cache.get("m.pt")
    with pytest.raises(Conflict, match="missing"):
        cache.get("absent.pt")
    assert len(cache) == 0 and cache.loads == 0
    # The worker's way: a temporary file renamed into place; then the whole model loads.
    save_checkpoint(model, tmp_path / "m.pt")
    assert same_weights(cache.get("m.pt"), model)
    assert cache.get("../whole.pt") is not None  # only a name inside the folder is ever read


# --- predict over a batch --------------------------------------------------------------------


def test_probabilities_sum_to_1_and_top_k_is_ranked(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    save(tmp_path, "m.pt", seed=4)
    with sessions.begin() as session:
        job = job_repo.create_job(session, JobCreate(), max_attempts=1, now=utcnow())
        job.status, job.finished_at, job.checkpoint = JobStatus.SUCCEEDED, utcnow(), "m.pt"
        job_id = job.id
    images, _ = synthetic_digits(5, seed=6)
    x = images_to_tensor([encode(Image.fromarray(i)) for i in images])
    assert x.shape == (5, 1, 28, 28)
    predictor = Predictor(sessions, ModelCache(tmp_path, 2), ResolutionCache(1.0), ForwardBatcher())

    async def ask() -> tuple[str, list[dict[str, Any]]]:
        return await predictor.predict(x, ModelChoice(), top_k=3)

    answering, answers = anyio.run(ask)
    assert answering == job_id
    assert len(answers) == 5
    for answer in answers:
        assert answer["job_id"] == job_id
        Prediction.model_validate(answer)  # the schema the API documents
        assert abs(sum(answer["probabilities"]) - 1) < 1e-12
        ranked = [p["probability"] for p in answer["top_k"]]
        assert len(ranked) == 3 and answer["top_k"][0]["digit"] == answer["digit"]
        assert ranked == sorted(answer["probabilities"], reverse=True)[:3]


def test_a_bad_image_in_a_batch_is_named_by_its_index() -> None:
    good = encode(Image.new("L", (28, 28)))
    with pytest.raises(UnsupportedMediaType, match=r"^files\[1\]: the file is not an image"):
        images_to_tensor([good, b"<svg/>", good])
    with pytest.raises(InvalidInput, match=r"^files\[2\]: the image is empty"):
        images_to_tensor([good, good, b""])
