"""Predict: images → MNIST-layout tensors → a cached model's probabilities."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sqlalchemy.orm import Session

from service import imaging, model_registry
from service.errors import Conflict, ServiceError
from service.ml import IMAGE_SIDE_PX, SimpleMLP, load_model, normalize_uint8
from service.schemas import DigitProbability, Prediction

# Re-exported: what the predict route tells clients it accepts.
ACCEPTED_FORMATS_TEXT = imaging.ACCEPTED_FORMATS_TEXT
DEFAULT_MAX_IMAGE_PIXELS = imaging.DEFAULT_MAX_IMAGE_PIXELS


def image_to_tensor(
    data: bytes, *, max_pixels: int = imaging.DEFAULT_MAX_IMAGE_PIXELS
) -> torch.Tensor:
    """Image bytes → a 1×1×28×28 float32 tensor in MNIST's layout and normalisation.

    See :mod:`service.imaging`. A 28×28 grayscale MNIST digit gives exactly the tutorial's
    ``ToTensor()`` + ``Normalize`` tensor.
    """
    return images_to_tensor([data], max_pixels=max_pixels)


def images_to_tensor(
    images: Sequence[bytes], *, max_pixels: int = imaging.DEFAULT_MAX_IMAGE_PIXELS
) -> torch.Tensor:
    """Several images → one N×1×28×28 batch; an error names the image (``files[i]``)."""
    fields = np.empty((len(images), IMAGE_SIDE_PX, IMAGE_SIDE_PX), dtype=np.uint8)
    for i, data in enumerate(images):
        try:
            fields[i] = imaging.mnist_layout(imaging.decode(data, max_pixels=max_pixels))
        except ServiceError as exc:
            if len(images) == 1:
                raise
            raise type(exc)(f"files[{i}]: {exc.message}", exc.details) from exc
    return normalize_uint8(torch.from_numpy(fields))


def pixels_to_tensor(pixels: list[list[float]]) -> torch.Tensor:
    """A validated 28×28 list of 0–255 values → a 1×1×28×28 tensor (inverted when light).

    Integer values give exactly the tutorial's tensor for the same uint8 image.
    """
    array = imaging.pixels_layout(np.asarray(pixels, dtype=np.float32))
    return normalize_uint8(torch.from_numpy(array).unsqueeze(0))


class ModelCache:
    """Loaded models by checkpoint file, least recently used evicted.

    Each file is loaded once even when many requests ask for it at the same moment: the
    first one loads it while the others wait on that load alone; loads of different files
    run in parallel, and cached models are served while any load runs. A load that fails is
    not remembered: the next request tries again.
    """

    def __init__(self, checkpoint_dir: Path, capacity: int) -> None:
        self._dir = checkpoint_dir
        self._capacity = capacity
        self._models: OrderedDict[str, SimpleMLP] = OrderedDict()
        self._loading: dict[str, Future[SimpleMLP]] = {}
        self._lock = threading.Lock()  # guards the two dicts; never held while loading
        self.loads = 0  # how many times a checkpoint was read from disk

    def __len__(self) -> int:
        with self._lock:
            return len(self._models)

    def get(self, checkpoint: str) -> SimpleMLP:
        """The model stored in ``checkpoint`` (a file name inside the checkpoints folder)."""
        with self._lock:
            model = self._models.get(checkpoint)
            if model is not None:
                self._models.move_to_end(checkpoint)
                return model
            pending = self._loading.get(checkpoint)
            owner = pending is None
            if pending is None:
                pending = self._loading[checkpoint] = Future()
        if not owner:
            return pending.result()
        try:
            model = self._load(checkpoint)
        except BaseException as exc:
            with self._lock:
                del self._loading[checkpoint]
            pending.set_exception(exc)
            raise
        with self._lock:
            del self._loading[checkpoint]
            self._models[checkpoint] = model
            while len(self._models) > self._capacity:
                self._models.popitem(last=False)
        pending.set_result(model)
        return model

    def _load(self, checkpoint: str) -> SimpleMLP:
        # Workers write checkpoints to a temporary name and rename them into place, and record
        # the name only after that: a file found under its recorded name is whole. A file that
        # still does not load (damaged on disk) is refused, never half-used.
        path = self._dir / Path(checkpoint).name
        if not path.is_file():
            raise Conflict(f"the checkpoint of this model is missing from {self._dir.name}/")
        try:
            model = load_model(path)
        except Exception as exc:  # torch raises many types for a damaged file
            raise Conflict(f"the checkpoint {path.name} cannot be loaded: {exc}") from exc
        with self._lock:
            self.loads += 1
        return model


@dataclass(frozen=True)
class ModelChoice:
    """Which model answers: by job id, by alias, or (neither) the default."""

    job_id: str | None = None
    alias: str | None = None


def predict(
    session: Session,
    cache: ModelCache,
    x: torch.Tensor,
    choice: ModelChoice,
    *,
    top_k: int | None = None,
) -> list[Prediction]:
    """One prediction per image of the batch ``x`` (N×1×28×28), by the chosen model."""
    job = model_registry.resolve(session, job_id=choice.job_id, alias=choice.alias)
    assert job.checkpoint is not None
    model = cache.get(job.checkpoint)
    with torch.inference_mode():
        logits = model(x)
    # Softmax in float64: the ten probabilities then sum to 1 within 1e-15.
    probabilities = torch.softmax(logits.double(), dim=1)
    rows: list[list[float]] = probabilities.tolist()
    predictions = []
    for row in rows:
        ranked = sorted(range(len(row)), key=row.__getitem__, reverse=True)
        top = None
        if top_k is not None:
            top = [DigitProbability(digit=d, probability=row[d]) for d in ranked[:top_k]]
        predictions.append(Prediction(digit=ranked[0], probabilities=row, job_id=job.id, top_k=top))
    return predictions
