"""MNIST, decoded and normalised once per process and kept on the training device."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.datasets import MNIST

from service.ml import normalize_uint8

log = logging.getLogger("workers")


@dataclass(frozen=True)
class Split:
    """One MNIST split as tensors: normalised N×1×28×28 float32 images and int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor

    def first(self, n: int, what: str) -> Split:
        """The first ``n`` examples; a clear error when the split holds fewer."""
        if n > len(self.labels):
            raise ValueError(f"{what} is {n} but the data set holds only {len(self.labels)} images")
        return Split(self.images[:n], self.labels[:n])


@dataclass(frozen=True)
class Mnist:
    """Both splits, on one device."""

    train: Split
    test: Split


_cache: dict[tuple[str, bool, str], Split] = {}
_cache_lock = threading.Lock()


class DataUnavailable(Exception):
    """This host cannot read the data set: a fault of the host, not of the job, handed back
    as a storage fault is (``workers.endings``). The message is the one clients read, so it
    names no path; the detail is chained."""


def _read_split(root: Path, *, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The split's tensors; :class:`DataUnavailable` when this host cannot read them: a fault of
    the host, not of the job, which goes back to the queue for a worker that can (it failed
    every job a misconfigured worker claimed, a queue drained into ``failed`` in seconds)."""
    try:
        ds = MNIST(root=str(root), train=train, download=download)
    except (RuntimeError, OSError) as exc:  # missing files; a download that failed
        if download:
            detail = f"MNIST could not be downloaded to {root}/MNIST/raw ({exc})"
        else:
            detail = (
                f"MNIST not found under {root}/MNIST/raw; set MNIST_DATA_DIR to the folder "
                "holding MNIST/raw, or MNIST_DOWNLOAD=true to fetch it"
            )
        raise DataUnavailable("the worker's host could not read the MNIST data") from OSError(
            detail
        )
    return ds.data, ds.targets


def load_split(root: Path, *, train: bool, device: torch.device, download: bool) -> Split:
    """One split, read and normalised on first use, then served from the process cache.

    Normalisation runs on the CPU, exactly as the tutorial's per-image transform, before the
    tensor moves to the device, so every device trains on identical inputs.
    """
    key = (str(root.resolve()), train, str(device))
    with _cache_lock:
        split = _cache.get(key)
        if split is None:
            images, labels = _read_split(root, train=train, download=download)
            split = Split(
                normalize_uint8(images).to(device),
                labels.to(device=device, dtype=torch.int64),
            )
            _cache[key] = split
    return split


def load_mnist(root: Path, *, device: torch.device, download: bool) -> Mnist:
    """Both splits of MNIST on ``device``."""
    return Mnist(
        train=load_split(root, train=True, device=device, download=download),
        test=load_split(root, train=False, device=device, download=download),
    )


def preload_mnist(root: Path, *, device: torch.device, download: bool) -> None:
    """Read MNIST into the cache before a worker's first claim, so that no job waits for it;
    if it cannot be read now, each job tries again, and goes back to the queue if it cannot."""
    try:
        load_mnist(root, device=device, download=download)
    except Exception as exc:  # noqa: BLE001 - the job that needs the data reports it
        log.warning("could not load MNIST yet: %s", exc.__cause__ or exc)
