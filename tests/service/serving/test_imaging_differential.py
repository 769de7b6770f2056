"""The pipeline in strips and lookup tables gives what the whole-image pipeline gave (issue #14).

:mod:`tests.service.serving.imaging_before` is the pipeline as it was; every image of a corpus
of ordinary uploads (8-bit L, LA, RGB, RGBA, P with and without transparency, as PNG and JPEG,
small and taller than a strip, light and dark backgrounds, noise) must give the same 28×28
field, bit for bit, and so the same tensor. 16-bit images too, with a tolerance of zero: both
round v / 257 to the nearest level, once in float64 and once in integers, and v / 257 is never
within float64's error of a halfway point (its fraction is k / 257), so no pixel can differ.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from service.ml import normalization_table
from service.serving import grayscale, imaging
from service.serving.predictor import image_to_tensor
from tests.service.images import EXTRA_VARIANTS, VARIANTS, encode
from tests.service.serving import imaging_before as before
from tests.support import synthetic_digits

MIB = 1024 * 1024


def _drawing(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Strokes of varied ink on a light, dark or mid-grey noisy background."""
    background = int(rng.choice([0, 12, 90, 200, 245, 255]))
    canvas = np.full((height, width), background, np.int16)
    canvas += rng.integers(-8, 9, size=(height, width), dtype=np.int16) * int(rng.integers(0, 2))
    ink = 255 - background if background < 128 else -background
    for _ in range(int(rng.integers(1, 5))):
        top, left = int(rng.integers(0, height - 4)), int(rng.integers(0, width - 4))
        bottom = int(rng.integers(top + 2, min(height, top + height // 2 + 3)))
        right = int(rng.integers(left + 2, min(width, left + width // 2 + 3)))
        canvas[top:bottom, left:right] += int(ink * rng.uniform(0.3, 1.0))
    return np.clip(canvas, 0, 255).astype(np.uint8)


def _ordinary_images() -> Iterator[tuple[str, bytes]]:
    rng = np.random.default_rng(14)
    sizes = [(28, 28), (40, 33), (120, 90), (256, 300), (257, 200), (700, 310), (1000, 1200)]
    for n, (height, width) in enumerate(sizes * 3):
        gray = _drawing(rng, height, width)
        colour = np.dstack([gray, np.roll(gray, 3, axis=1), 255 - gray // 2])
        alpha = rng.integers(0, 256, size=(height, width), dtype=np.uint8)
        name = f"{n}:{height}x{width}"
        yield f"{name} L png", encode(Image.fromarray(gray))
        yield f"{name} RGB png", encode(Image.fromarray(colour))
        yield f"{name} RGBA png", encode(Image.fromarray(np.dstack([colour, alpha])))
        yield f"{name} LA png", encode(Image.fromarray(np.dstack([gray, alpha])))
        palette = Image.fromarray(colour).quantize(16)
        yield f"{name} P png", encode(palette)
        yield f"{name} P png, transparency", encode(palette, transparency=int(rng.integers(16)))
        yield f"{name} L jpeg", encode(Image.fromarray(gray), "JPEG", quality=85)
        yield f"{name} RGB jpeg", encode(Image.fromarray(colour), "JPEG", quality=90)
    digits, _ = synthetic_digits(6, seed=5)
    for i, digit in enumerate(digits):
        for variant, make in {**VARIANTS, **EXTRA_VARIANTS}.items():
            yield f"digit {i} {variant}", make(digit, np.random.default_rng(i))


def _sixteen_bit_images() -> Iterator[tuple[str, bytes]]:
    rng = np.random.default_rng(16)
    for height, width in [(28, 28), (64, 80), (300, 280), (600, 500)]:
        every_level = rng.permutation(np.arange(65536, dtype=np.uint16))
        noise = np.resize(every_level, (height, width))  # all 65,536 values, halfway cases too
        yield f"{height}x{width} every level", encode(Image.fromarray(noise))
        drawing = _drawing(rng, height, width).astype(np.uint16) * 257
        drawing += rng.integers(0, 257, size=(height, width), dtype=np.uint16)
        yield f"{height}x{width} drawing", encode(Image.fromarray(drawing))


def _field_before(data: bytes) -> np.ndarray:
    return before.mnist_layout(before.decode(data))


def _field_now(data: bytes) -> np.ndarray:
    field: np.ndarray = imaging.mnist_layout(imaging.decode(data))
    return field


def _traced_field(data: bytes) -> tuple[np.ndarray, int]:
    """The field of ``data`` and the peak of numpy's allocations (traced) while it was made."""
    tracemalloc.start()
    try:
        field = _field_now(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return field, peak


@pytest.mark.parametrize(
    "corpus", [_ordinary_images, _sixteen_bit_images], ids=["ordinary", "16-bit"]
)
def test_every_image_gives_the_field_and_tensor_it_gave_before(corpus: object) -> None:
    assert callable(corpus)
    seen, with_ink = 0, 0
    for name, data in corpus():
        old, new = _field_before(data), _field_now(data)
        assert old.dtype == new.dtype == np.uint8 and old.shape == new.shape == (28, 28), name
        assert np.array_equal(old, new), name
        expected = torch.from_numpy(normalization_table()[old])
        assert torch.equal(image_to_tensor(data)[0, 0], expected), name
        seen += 1
        with_ink += bool(new.any())
    assert seen >= 8 and with_ink >= seen // 2  # the corpus exercises the layout, not blanks


def test_sixteen_bit_and_32_bit_grayscale_convert_as_before() -> None:
    """Mode I (32-bit, as older Pillows opened 16-bit PNGs) clips below 0 and above 65,535."""
    rng = np.random.default_rng(32)
    values = rng.integers(-100_000, 200_000, size=(300, 70), dtype=np.int32)
    values[0, :9] = [-1, 0, 128, 129, 385, 386, 65_407, 65_535, 65_536]
    sixteen = np.clip(values, 0, 65_535).astype("<u2")
    for image in (Image.fromarray(values), Image.fromarray(sixteen)):
        assert np.array_equal(grayscale.to_gray(image), before._grayscale(image)), image.mode


def test_a_16_mpx_16_bit_png_never_exists_in_wide_types() -> None:
    """numpy's allocations (traced) for a 4000×4000 16-bit upload stay near its 8-bit copy."""
    canvas = np.zeros((4000, 4000), np.uint16)
    canvas[1000:3000, 1800:2200] = 60_000
    data = encode(Image.fromarray(canvas))
    del canvas
    field, peak = _traced_field(data)
    assert field.max() == 255 and field.sum() > 0
    # 16 MB for the 8-bit image and at most as much for its ink's box, plus the
    # strips; before, float64 copies of it alone were 128 MB each.
    assert peak < 40 * MIB, f"{peak / MIB:.0f} MiB"


THIN = [
    ((244, 65_535), "L"),
    ((65_535, 244), "L"),
    ((244, 65_535), "I;16"),
    ((244, 65_535), "RGBA"),
]


@pytest.mark.parametrize(("shape", "mode"), THIN, ids=["wide", "tall", "wide-16-bit", "wide-RGBA"])
def test_an_image_as_long_as_accepted_is_read_without_copies_of_it_in_wide_types(
    shape: tuple[int, int], mode: str
) -> None:
    """16 Mpx on the longest side accepted, rows longer than a strip: numpy's allocations
    (traced) stay near the 8-bit image, as for a square one (a 16-bit or RGBA row was converted
    whole, in wider types)."""
    canvas = np.full(shape, 255, np.uint8)
    stroke = (slice(100, 140), slice(20_000, 40_000))  # dark, along the long side
    canvas[stroke if shape[0] < shape[1] else stroke[::-1]] = 0
    if mode == "I;16":
        image = Image.fromarray(canvas.astype("<u2") * 257)
    elif mode == "RGBA":
        image = Image.fromarray(np.dstack([canvas] * 3 + [np.full(shape, 255, np.uint8)]))
    else:
        image = Image.fromarray(canvas)
    assert image.mode == mode
    data = encode(image)
    del canvas, image
    field, peak = _traced_field(data)
    assert field.max() == 255
    assert peak < 64 * MIB, f"{peak / MIB:.0f} MiB"
