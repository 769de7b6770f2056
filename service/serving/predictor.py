"""Predict: images → MNIST-layout tensors → a cached model's probabilities."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from typing import Any

import anyio.to_thread
import numpy as np
import orjson
import torch
from cachetools import LRUCache
from numpy.typing import NDArray
from sqlalchemy.orm import Session, sessionmaker

from service.errors import ServiceError
from service.ml import (
    SimpleMLP,
    normalization_table,
    normalize_uint8,
)
from service.serving import imaging
from service.serving import registry as model_registry
from service.serving.batching import ForwardBatcher
from service.serving.decode_slots import DecodeSlots, release_freed_memory
from service.serving.single_flight import SingleFlight
from service.store.artifacts.backends import ArtifactSource
from service.store.availability import unavailable_as_503

# Re-exported: what the predict route tells clients it accepts.
ACCEPTED_FORMATS_TEXT = imaging.ACCEPTED_FORMATS_TEXT
DEFAULT_MAX_IMAGE_PIXELS = imaging.DEFAULT_MAX_IMAGE_PIXELS
# After decoding an image of at least this many pixels, the memory freed is handed back to the
# system; below it, what glibc keeps for reuse is small and soon reused.
RELEASE_MIN_PIXELS = 1_000_000
log = logging.getLogger("service.models")


def image_to_tensor(
    data: bytes, *, max_pixels: int = imaging.DEFAULT_MAX_IMAGE_PIXELS
) -> torch.Tensor:
    """Image bytes → a 1×1×28×28 float32 tensor in MNIST's layout and normalisation.

    See :mod:`service.serving.imaging`. A 28×28 grayscale MNIST digit gives exactly the tutorial's
    ``ToTensor()`` + ``Normalize`` tensor.
    """
    return images_to_tensor([data], max_pixels=max_pixels)


def images_to_tensor(
    images: Sequence[bytes],
    *,
    max_pixels: int = imaging.DEFAULT_MAX_IMAGE_PIXELS,
    named: bool = False,
) -> torch.Tensor:
    """Several images → one N×1×28×28 batch; an error names the image (``files[i]``) when
    there are several, or when ``named`` (sent as ``files``, even one)."""
    names = image_names(len(images), named=named)
    pairs = zip(images, names, strict=True)
    return fields_to_tensor([image_field(d, max_pixels=max_pixels, name=n) for d, n in pairs])


def image_names(count: int, *, named: bool) -> list[str | None]:
    """What an error calls each of ``count`` images: ``files[i]``, or nothing for one sent alone."""
    return [None] if count == 1 and not named else [f"files[{i}]" for i in range(count)]


def image_field(data: bytes, *, max_pixels: int, name: str | None) -> NDArray[np.uint8]:
    """One image → its 28×28 uint8 field in MNIST's layout; an error is prefixed with ``name``."""
    gray: NDArray[np.uint8] | None = None
    try:
        gray = imaging.decode(data, max_pixels=max_pixels)
        return imaging.mnist_layout(gray)
    except ServiceError as exc:
        if name is None:
            raise
        raise type(exc)(f"{name}: {exc.message}", exc.details) from exc
    finally:
        if gray is not None and gray.size >= RELEASE_MIN_PIXELS:
            del gray
            release_freed_memory()


def fields_to_tensor(fields: Sequence[NDArray[np.uint8]]) -> torch.Tensor:
    """28×28 uint8 fields → an N×1×28×28 batch in the tutorial's normalisation."""
    return torch.from_numpy(normalization_table()[np.stack(fields)]).unsqueeze(1)


def pixels_to_tensor(pixels: list[list[float]]) -> torch.Tensor:
    """A validated 28×28 list of 0–255 values → a 1×1×28×28 tensor (inverted when light).

    Integer values give exactly the tutorial's tensor for the same uint8 image.
    """
    array = imaging.pixels_layout(np.asarray(pixels, dtype=np.float32))
    return normalize_uint8(torch.from_numpy(array).unsqueeze(0))


class ModelCache:
    """Loaded models by checkpoint file, least recently used evicted (``cachetools.LRUCache``).

    Each file is loaded once even when many requests ask for it at the same moment: the
    first one starts the load (in a thread: ``torch.load`` blocks) and all of them await it
    on the event loop, so they hold one thread between them; loads of different files run in
    parallel, and cached models are served while any load runs. A load that fails is not
    remembered: the next request tries again. Used from the API's event loop only, so the
    cache needs no lock.
    """

    def __init__(self, source: ArtifactSource, capacity: int) -> None:
        self._source = source
        self._models: LRUCache[str, SimpleMLP] = LRUCache(maxsize=capacity)
        self._loads: SingleFlight[str, SimpleMLP] = SingleFlight()
        self.loads = 0  # how many times a checkpoint was read (from its file or its row)

    def __len__(self) -> int:
        return len(self._models)

    def waiting(self, checkpoint: str) -> int:
        """How many callers wait for the load of ``checkpoint`` under way."""
        return self._loads.waiting(checkpoint)

    def peek(self, checkpoint: str) -> SimpleMLP | None:
        """The model of ``checkpoint`` if it is loaded (marked as just used), else None."""
        return self._models.get(checkpoint)

    def evict(self, checkpoint: str) -> None:
        """Forget the model of ``checkpoint``: its job was deleted. (A load of it in flight
        still answers the requests that wait for it, and is then stored: only a resolution
        names a checkpoint, and a deleted job's no longer resolves.)"""
        self._models.pop(checkpoint, None)

    async def get(self, checkpoint: str) -> SimpleMLP:
        """The model stored in ``checkpoint`` (the name a job's row holds)."""
        model = self._models.get(checkpoint)
        if model is not None:
            return model
        return await self._loads.run(checkpoint, lambda: self._load_and_keep(checkpoint))

    async def _load_and_keep(self, checkpoint: str) -> SimpleMLP:
        model = await anyio.to_thread.run_sync(self._load, checkpoint)
        self.loads += 1
        self._models[checkpoint] = model
        return model

    def _load(self, checkpoint: str) -> SimpleMLP:
        # Workers write a file to a temporary name and rename it into place, or a row in the
        # transaction that names it, and record the name only after that: what is found
        # under its recorded name is whole. What still does not load (damaged on disk) is
        # refused, never half-used.
        where = self._source.where(checkpoint)
        with unavailable_as_503("a model load"):
            source = self._source.open(checkpoint)
        return model_registry.loaded(source, where)


class Predictor:
    """Answers predictions: the images as tensors (a bounded number decoding at once), which
    model (resolutions cached), the model itself (loaded once), and the forward pass (batched
    with the other requests of the same event-loop turn).

    Only a cache miss leaves the event loop: resolving a choice reads the database and loading
    a model reads a file, both in the thread pool; a hit costs microseconds.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        models: ModelCache,
        resolutions: model_registry.ResolutionCache,
        batcher: ForwardBatcher,
        decodes: DecodeSlots,
    ) -> None:
        self.sessions = sessions
        self.models = models
        self.resolutions = resolutions
        self.batcher = batcher
        self.decodes = decodes

    async def images_tensor(
        self, images: Sequence[bytes], *, max_pixels: int, inline: bool = False, named: bool = False
    ) -> torch.Tensor:
        """:func:`images_to_tensor` in the decode slots, the one way every predict path decodes
        (the route on a thread, the fast lane ``inline`` on the loop): each image in a slot of
        its own, in its turn, so that a form of many large images does not hold a slot while
        others wait; 429 when too many requests already wait for a slot (:class:`DecodeSlots`)."""
        fields = []
        names = image_names(len(images), named=named)
        for i, (data, name) in enumerate(zip(images, names, strict=True)):
            decode = partial(image_field, data, max_pixels=max_pixels, name=name)
            fields.append(await self.decodes.run(decode, inline=inline, admitted=i > 0))
        return fields_to_tensor(fields)

    async def resolve(self, choice: model_registry.ModelChoice) -> model_registry.ResolvedModel:
        """The job and weights file that answer ``choice`` (404/409 as :func:`resolve`)."""
        return await self.resolutions.resolve(self.sessions, choice)

    async def predict(
        self, images: torch.Tensor, choice: model_registry.ModelChoice, *, top_k: int | None
    ) -> tuple[str, list[dict[str, Any]]]:
        """The answering job's id, and one prediction (as :class:`Prediction` serialises) per
        image of the batch ``images`` (N×1×28×28)."""
        resolved = await self.resolve(choice)
        model = await self.models.get(resolved.checkpoint)
        rows = await self.batcher.probabilities(resolved.checkpoint, model, images)
        return resolved.job_id, [prediction_body(row, resolved.job_id, top_k) for row in rows]


def prediction_body(row: list[float], job_id: str, top_k: int | None) -> dict[str, Any]:
    """One image's answer, as the :class:`Prediction` schema serialises it (no ``top_k`` key
    unless asked for)."""
    ranked = sorted(range(len(row)), key=row.__getitem__, reverse=True)
    body: dict[str, Any] = {"digit": ranked[0], "probabilities": row, "job_id": job_id}
    if top_k is not None:
        body["top_k"] = [{"digit": d, "probability": row[d]} for d in ranked[:top_k]]
    return body


def json_bytes(body: object) -> bytes:
    """A response body as JSON (orjson: several times faster than the standard library)."""
    return orjson.dumps(body)
