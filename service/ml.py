"""The model, MNIST's normalisation, devices and checkpoints: shared by training and predict."""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, TypeVar, cast

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
IMAGE_SIDE_PX = 28
NUM_CLASSES = 10

T = TypeVar("T")


class SimpleMLP(nn.Module):
    """The tutorial's model: Flatten → Linear(784, 100) → ReLU → Linear(100, 10), logits out."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(IMAGE_SIDE_PX * IMAGE_SIDE_PX, 100),
            nn.ReLU(),
            nn.Linear(100, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of normalised 1×28×28 images."""
        logits: torch.Tensor = self.net(x)
        return logits


def normalize_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (N×28×28) → float32 N×1×28×28, exactly as ``ToTensor()`` + ``Normalize``.

    ToTensor divides by 255 in float32; Normalize subtracts and divides by float32 tensors.
    The same operations on the whole tensor give bit-identical values, image by image.
    """
    mean = torch.as_tensor(MNIST_MEAN, dtype=torch.float32, device=images.device)
    std = torch.as_tensor(MNIST_STD, dtype=torch.float32, device=images.device)
    x = images.to(torch.float32).div(255)
    return x.sub_(mean).div_(std).unsqueeze(1)


@functools.cache
def normalization_table() -> NDArray[np.float32]:
    """The 256 values :func:`normalize_uint8` gives a uint8 pixel, computed by it: indexing
    this table normalises an image bit-identically at the cost of one lookup per pixel."""
    values = normalize_uint8(torch.arange(256, dtype=torch.uint8).unsqueeze(0))
    table: NDArray[np.float32] = values.reshape(256).numpy()
    table.flags.writeable = False
    return table


class DeviceUnavailable(RuntimeError):
    """The device a setting names is not on this machine: a configuration to fix, which no
    restart cures."""


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit name must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable("MNIST_DEVICE=cuda but no CUDA device is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise DeviceUnavailable("MNIST_DEVICE=mps but MPS is not available")
    if name == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def checkpoint_path(checkpoint_dir: Path, job_id: str) -> Path:
    """Where a job's weights live (the id is validated hex, never a path)."""
    return checkpoint_dir / f"{job_id}.pt"


def atomic_torch_save(obj: object, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash at any point leaves either the previous file or the new one, never a torn one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_host(obj: T) -> T:
    """``obj`` (tensors in dicts, lists and tuples) with every tensor on the CPU.

    From a CUDA card the copies are queued together and waited for once: copying tensor by
    tensor would stop the card's queue once per tensor (a checkpoint has 16 of them). Each
    tensor is copied on its own, as ``torch.save`` of a view writes only the view's elements.
    """
    cards: set[torch.device] = set()

    def copy(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if value.device.type == "cuda":
                cards.add(value.device)
                # non_blocking: the copy lands in pinned memory, valid after the wait below.
                return value.detach().to("cpu", non_blocking=True)
            return value.detach().to("cpu")
        if isinstance(value, dict):
            return {k: copy(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            items = [copy(v) for v in value]
            # A named tuple's constructor takes its fields one by one.
            return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
        return value

    copied = copy(obj)
    for card in cards:
        torch.cuda.current_stream(card).synchronize()
    return cast(T, copied)


def save_checkpoint(model: nn.Module, path: Path) -> None:
    """Write the model's weights (a plain state_dict on the CPU) atomically."""
    atomic_torch_save(to_host(model.state_dict()), path)


def load_model(path: Path | BinaryIO, device: torch.device | str = "cpu") -> SimpleMLP:
    """A SimpleMLP in eval mode with the weights at ``path`` (a file, or a stored artifact's
    bytes), loaded without unpickling code; ValueError for weights that are not finite."""
    state = torch.load(path, map_location=device, weights_only=True)
    model = SimpleMLP().to(device)
    model.load_state_dict(state)
    # Training never stores a weight that is not finite (a loss that is not stops the job), so
    # one here is damage: it answered every image with null probabilities.
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise ValueError("the weights are not all finite numbers")
    return model.eval()
