"""Image bytes → the tensor the model sees; the model cache; predictions over a batch."""

from __future__ import annotations

import threading
from collections.abc import Callable, Coroutine
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
from service.serving.decode_slots import DecodeSlots
from service.serving.predictor import ModelCache, Predictor, image_to_tensor, images_to_tensor
from service.serving.registry import CHECKPOINT_UNUSABLE, ModelChoice, ResolutionCache
from service.status import JobStatus
from service.store import job_repo
from tests.service.images import TUTORIAL, encode, png_claiming_size
from tests.support import files_only, synthetic_digits, wait_until


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


def get(cache: ModelCache, checkpoint: str) -> SimpleMLP:
    """One request for a model, on an event loop of its own."""
    return anyio.run(cache.get, checkpoint)


async def gather(calls: int, ask: Callable[[], Coroutine[Any, Any, object]]) -> None:
    async with anyio.create_task_group() as tasks:
        for _ in range(calls):
            tasks.start_soon(ask)


async def release_when_all_wait(
    cache: ModelCache, checkpoint: str, callers: int, release: threading.Event
) -> None:
    """Let the load finish once every caller waits for it (no sleeping on a hunch)."""
    try:
        await wait_until(
            lambda: cache.waiting(checkpoint) == callers,
            timeout_s=JOIN_S,
            what=f"{callers} callers waiting for the load",
        )
    finally:
        release.set()  # even on failure: a load left blocked would hang the test's end


def test_the_cache_keeps_the_most_recently_used_models(tmp_path: Path) -> None:
    for i in range(3):
        save(tmp_path, f"m{i}.pt", seed=i)
    cache = ModelCache(files_only(tmp_path), capacity=2)
    m0 = get(cache, "m0.pt")
    get(cache, "m1.pt")
    assert get(cache, "m0.pt") is m0  # a hit: m0 is now the most recent
    get(cache, "m2.pt")  # evicts m1, the least recently used
    assert len(cache) == 2 and cache.loads == 3
    assert cache.peek("m1.pt") is None
    assert get(cache, "m0.pt") is m0 and cache.loads == 3
    get(cache, "m1.pt")
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
        assert release.wait(JOIN_S)  # until every caller waits for this load
        return load_model(path, device)

    monkeypatch.setattr("service.serving.registry.load_model", slow_load)
    cache = ModelCache(files_only(tmp_path), capacity=4)
    got: list[SimpleMLP] = []

    async def ask() -> None:
        got.append(await cache.get("m.pt"))

    async def main() -> None:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(gather, callers, ask)
            tasks.start_soon(release_when_all_wait, cache, "m.pt", callers, release)

    anyio.run(main)
    assert disk_reads == ["m.pt"] and cache.loads == 1
    assert len(got) == callers and all(m is got[0] for m in got)
    assert same_weights(got[0], saved)
    assert cache.waiting("m.pt") == 0


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

    monkeypatch.setattr("service.serving.registry.load_model", load)
    cache = ModelCache(files_only(tmp_path), capacity=4)

    async def fast() -> None:
        await cache.get("fast.pt")
        fast_loaded.set()

    async def main() -> None:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(cache.get, "slow.pt")
            tasks.start_soon(fast)

    anyio.run(main)
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
        assert release.wait(JOIN_S)  # until every caller waits for this load
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("service.serving.registry.load_model", failing)
    cache = ModelCache(files_only(tmp_path), capacity=4)
    errors: list[str] = []

    async def ask() -> None:
        try:
            await cache.get("m.pt")
        except Conflict as exc:
            errors.append(exc.message)

    async def main() -> None:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(gather, callers, ask)
            tasks.start_soon(release_when_all_wait, cache, "m.pt", callers, release)

    anyio.run(main)
    assert len(attempts) == 1 and len(errors) == callers
    # The client is told nothing of the cause (the log is): no library's words, no path.
    assert errors == [CHECKPOINT_UNUSABLE] * callers
    monkeypatch.setattr("service.serving.registry.load_model", load_model)
    get(cache, "m.pt")  # not remembered as failed
    assert cache.loads == 1


def test_a_half_written_checkpoint_is_never_served(tmp_path: Path) -> None:
    model = save(tmp_path, "whole.pt", seed=3)
    whole = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "m.pt").write_bytes(whole[: len(whole) // 2])
    cache = ModelCache(files_only(tmp_path), capacity=2)
    with pytest.raises(Conflict) as damaged:
        get(cache, "m.pt")
    with pytest.raises(Conflict) as missing:
        get(cache, "absent.pt")
    assert damaged.value.message == missing.value.message == CHECKPOINT_UNUSABLE
    assert len(cache) == 0 and cache.loads == 0
    # The worker's way: a temporary file renamed into place; then the whole model loads.
    save_checkpoint(model, tmp_path / "m.pt")
    assert same_weights(get(cache, "m.pt"), model)
    assert get(cache, "../whole.pt") is not None  # only a name inside the folder is ever read


# --- predict over a batch --------------------------------------------------------------------


def add_model(sessions: sessionmaker[Session], tmp_path: Path) -> str:
    """A succeeded job whose weights are ``m.pt`` in ``tmp_path``: the default model."""
    save(tmp_path, "m.pt", seed=4)
    with sessions.begin() as session:
        job = job_repo.create_job(session, JobCreate(), max_attempts=1, now=utcnow())
        job.status, job.finished_at, job.checkpoint = JobStatus.SUCCEEDED, utcnow(), "m.pt"
        return job.id


def test_probabilities_sum_to_1_and_top_k_is_ranked(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    job_id = add_model(sessions, tmp_path)
    images, _ = synthetic_digits(5, seed=6)
    x = images_to_tensor([encode(Image.fromarray(i)) for i in images])
    assert x.shape == (5, 1, 28, 28)
    predictor = Predictor(
        sessions,
        ModelCache(files_only(tmp_path), 2),
        ResolutionCache(1.0),
        ForwardBatcher(),
        DecodeSlots(2, 8),
    )

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


def test_requests_waiting_for_a_load_hold_no_threads(
    sessions: sessionmaker[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20 predictions of a model being loaded hold one thread between them: with the pool
    limited to three, other work still gets a thread while they wait."""
    job_id = add_model(sessions, tmp_path)
    callers = 20
    release = threading.Event()

    def held_load(path: Path, device: str = "cpu") -> SimpleMLP:
        assert release.wait(JOIN_S)  # until the other work has had its thread
        return load_model(path, device)

    monkeypatch.setattr("service.serving.registry.load_model", held_load)
    predictor = Predictor(
        sessions,
        ModelCache(files_only(tmp_path), 2),
        ResolutionCache(1.0),
        ForwardBatcher(),
        DecodeSlots(2, 8),
    )
    x = images_to_tensor([encode(Image.new("L", (28, 28)))])
    answered: list[str] = []

    async def ask() -> None:
        answered.append((await predictor.predict(x, ModelChoice(), top_k=None))[0])

    async def other_work() -> str:
        try:
            await wait_until(
                lambda: predictor.models.waiting("m.pt") == callers,
                timeout_s=JOIN_S,
                what=f"{callers} predictions waiting for the load",
            )
            with anyio.fail_after(JOIN_S):  # blocked behind the waiters, this would time out
                return await anyio.to_thread.run_sync(lambda: "ran")
        finally:
            release.set()

    async def main() -> str:
        anyio.to_thread.current_default_thread_limiter().total_tokens = 3
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(gather, callers, ask)
            ran = await other_work()
        return ran

    assert anyio.run(main) == "ran"
    assert answered == [job_id] * callers
    assert predictor.models.loads == 1


def test_a_bad_image_in_a_batch_is_named_by_its_index() -> None:
    good = encode(Image.new("L", (28, 28)))
    with pytest.raises(UnsupportedMediaType, match=r"^files\[1\]: the file is not an image"):
        images_to_tensor([good, b"<svg/>", good])
    with pytest.raises(InvalidInput, match=r"^files\[2\]: the image is empty"):
        images_to_tensor([good, good, b""])
