"""Image bytes → the tensor the model sees."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.datasets import MNIST

from service.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from service.ml import MNIST_MEAN, MNIST_STD
from service.predict import image_to_tensor

TUTORIAL = transforms.Compose(
    [transforms.ToTensor(), transforms.Normalize((MNIST_MEAN,), (MNIST_STD,))]
)


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge grayscale image (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


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
