"""Predict: an uploaded image → a normalised 28×28 tensor → a cached model's answer."""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from sqlalchemy.orm import Session

from service import repository
from service.errors import Conflict, InvalidInput, NotFound, PayloadTooLarge, UnsupportedMediaType
from service.ml import IMAGE_SIDE_PX, SimpleMLP, load_model, normalize_uint8
from service.models import Job, JobStatus
from service.schemas import Prediction

MAX_IMAGE_PIXELS = 25_000_000  # decoded size cap: far below Pillow's bomb threshold
ACCEPTED_FORMATS = "PNG, JPEG, BMP, GIF, WebP, TIFF"


def image_to_tensor(data: bytes) -> torch.Tensor:
    """Image bytes → a 1×1×28×28 float32 tensor normalised as MNIST's training data.

    Colour and alpha become grayscale; other sizes are resized to 28×28. A 28×28 grayscale
    image gives exactly the tutorial's ``ToTensor()`` + ``Normalize`` tensor.
    """
    if not data:
        raise InvalidInput("the uploaded file is empty")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise UnsupportedMediaType(
            f"the file is not an image; accepted: {ACCEPTED_FORMATS}"
        ) from exc
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(f"the image has more than {MAX_IMAGE_PIXELS} pixels") from exc
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise PayloadTooLarge(
            f"the image is {image.width}×{image.height} pixels; "
            f"at most {MAX_IMAGE_PIXELS} pixels allowed"
        )
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidInput(f"the image could not be decoded (truncated or corrupt): {exc}") from exc
    gray = image.convert("L")
    if gray.size != (IMAGE_SIDE_PX, IMAGE_SIDE_PX):
        gray = gray.resize((IMAGE_SIDE_PX, IMAGE_SIDE_PX), Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.asarray(gray, dtype=np.uint8).copy())
    return normalize_uint8(pixels.unsqueeze(0))


class ModelCache:
    """Loaded models by checkpoint file, least recently used evicted; each file loaded once."""

    def __init__(self, checkpoint_dir: Path, capacity: int) -> None:
        self._dir = checkpoint_dir
        self._capacity = capacity
        self._models: OrderedDict[str, SimpleMLP] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0  # how many times a checkpoint was read from disk

    def get(self, checkpoint: str) -> SimpleMLP:
        """The model stored in ``checkpoint`` (a file name inside the checkpoints folder)."""
        with self._lock:
            model = self._models.get(checkpoint)
            if model is not None:
                self._models.move_to_end(checkpoint)
                return model
            path = self._dir / Path(checkpoint).name
            if not path.is_file():
                raise Conflict(f"the checkpoint of this model is missing from {self._dir.name}/")
            model = load_model(path)
            self.loads += 1
            self._models[checkpoint] = model
            if len(self._models) > self._capacity:
                self._models.popitem(last=False)
            return model


def resolve_model_job(session: Session, job_id: str | None) -> Job:
    """The job whose model answers: the one asked for, else the latest succeeded job."""
    if job_id is None:
        job = repository.latest_succeeded_job(session)
        if job is None:
            raise Conflict("no trained model yet: POST /jobs and wait for a job to succeed")
        return job
    job = repository.get_job(session, job_id)
    if job is None:
        raise NotFound(f"no job with id {job_id}")
    if job.status != JobStatus.SUCCEEDED or job.checkpoint is None:
        raise Conflict(f"job {job_id} has no trained model (status {job.status})")
    return job


def predict(session: Session, cache: ModelCache, image: bytes, job_id: str | None) -> Prediction:
    """The digit in ``image`` according to the chosen job's model."""
    x = image_to_tensor(image)
    job = resolve_model_job(session, job_id)
    assert job.checkpoint is not None
    model = cache.get(job.checkpoint)
    with torch.inference_mode():
        probabilities = torch.softmax(model(x), dim=1)[0]
    return Prediction(
        digit=int(probabilities.argmax()), probabilities=probabilities.tolist(), job_id=job.id
    )
