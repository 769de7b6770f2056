"""Images for predict tests: encoders, a decompression bomb, and the variants of an MNIST digit."""

from __future__ import annotations

import functools
import io
import struct
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image
from torchvision import transforms

from service.ml import MNIST_MEAN, MNIST_STD

# The tutorial's transform: what a 28×28 MNIST digit must become, bit for bit.
TUTORIAL = transforms.Compose(
    [transforms.ToTensor(), transforms.Normalize((MNIST_MEAN,), (MNIST_STD,))]
)

SVG = (
    b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="28" height="28">'
    b'<text x="8" y="20" font-size="20">7</text></svg>'
)
TEXT = b"this is plainly text, not a picture\n" * 4


def encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    """The image as a file of format ``fmt``."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png(pixels: np.ndarray) -> bytes:
    """A grayscale (or RGB/RGBA, from the array's shape) PNG of a uint8 array."""
    return encode(Image.fromarray(pixels))


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


@functools.cache
def big_16_bit_png(side: int = 4000) -> bytes:
    """A ``side``×``side`` 16-bit grayscale PNG of a seven, a few tens of KB: the small upload
    that decodes to 16 Mpx × 2 bytes (issue #14)."""
    pixels = np.zeros((side, side), np.uint16)
    stroke = side // 12
    pixels[side // 5 : side // 5 + stroke, side // 4 : 3 * side // 4] = 60_000
    for row in range(side // 5, 4 * side // 5, stroke):  # the stem, a staircase down-left
        left = 3 * side // 4 - stroke - (row - side // 5) // 3
        pixels[row : row + stroke, left : left + stroke] = 60_000
    return encode(Image.fromarray(pixels))


def inverted(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """Black on white, 28×28."""
    return png(255 - digit)


def scaled_4x(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """112×112, bicubic."""
    return encode(Image.fromarray(digit).resize((112, 112), Image.Resampling.BICUBIC))


def padded_off_centre(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """The 28×28 digit somewhere in an 80×64 black field."""
    field = np.zeros((64, 80), np.uint8)
    top, left = int(rng.integers(0, 64 - 28 + 1)), int(rng.integers(0, 80 - 28 + 1))
    field[top : top + 28, left : left + 28] = digit
    return png(field)


def rgb_jpeg(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """An RGB JPEG (quality 90) of the 28×28 digit."""
    return encode(Image.fromarray(digit).convert("RGB"), "JPEG", quality=90)


def rgba_png(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """A canvas drawing: black ink whose opacity is the digit, on a transparent background."""
    rgba = np.zeros((*digit.shape, 4), np.uint8)
    rgba[..., 3] = digit
    return png(rgba)


@functools.cache
def _paper() -> np.ndarray:
    """Noisy cream paper, twice a photo's size: each photo is a random window of it."""
    rng = np.random.default_rng(1234)
    paper = np.full((800, 1200, 3), (235, 228, 210), np.float32)
    paper += rng.normal(0, 6, paper.shape).astype(np.float32)
    return np.clip(paper, 0, 255).astype(np.uint8)


def phone_photo(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """A 600×400 JPEG: dark blue ink, 6× larger, somewhere on noisy cream paper."""
    ink = np.asarray(Image.fromarray(digit).resize((168, 168), Image.Resampling.BICUBIC))
    alpha = ink.astype(np.float32)[..., None] / 255
    y, x = int(rng.integers(0, 400)), int(rng.integers(0, 600))
    photo = _paper()[y : y + 400, x : x + 600].copy()
    top, left = int(rng.integers(10, 400 - 178)), int(rng.integers(10, 600 - 178))
    region = photo[top : top + 168, left : left + 168].astype(np.float32)
    blended = region * (1 - alpha) + np.array((30, 40, 90), np.float32) * alpha
    photo[top : top + 168, left : left + 168] = np.rint(blended).astype(np.uint8)
    return encode(Image.fromarray(photo), "JPEG", quality=85)


Variant = Callable[[np.ndarray, np.random.Generator], bytes]
# The variants the issue names, and one harder case for the report.
VARIANTS: dict[str, Variant] = {
    "inverted": inverted,
    "scaled_4x": scaled_4x,
    "padded_off_centre": padded_off_centre,
    "rgb_jpeg": rgb_jpeg,
    "rgba_png": rgba_png,
}
EXTRA_VARIANTS: dict[str, Variant] = {"phone_photo": phone_photo}
