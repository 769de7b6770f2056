"""The image pipeline as it was before it worked in strips and lookup tables (issue #14).

Kept verbatim as the reference that :mod:`tests.service.serving.test_imaging_differential`
compares :mod:`service.serving.imaging` with: whole-image conversions in wide types (float64
for 16-bit images, float32 for the contrast stretch). Only the steps that changed are here;
the rest is the module's own.
"""

from __future__ import annotations

import io

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from service.serving import grayscale, imaging

Gray = NDArray[np.uint8]


def decode(data: bytes) -> Gray:
    """``imaging.decode`` of before, for valid images of an accepted format."""
    image = Image.open(io.BytesIO(data), formats=imaging.ACCEPTED_FORMATS)
    if image.format == "JPEG":
        image.draft("L", (imaging.JPEG_DRAFT_MIN_SIDE_PX, imaging.JPEG_DRAFT_MIN_SIDE_PX))
    image.load()
    return _grayscale(imaging._upright(image))


def _grayscale(image: Image.Image) -> Gray:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grayscale PNG
        wide = np.asarray(image, dtype=np.float64)
        return np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if not has_alpha:
        return np.asarray(image if image.mode == "L" else image.convert("L"), dtype=np.uint8)
    # Which backdrop came later (light ink on transparency goes on black): a rule, not what
    # this reference is for, so it asks the module's own, as mnist_layout does below.
    backdrop = grayscale.BLACK if grayscale._only_light_shows(image) else grayscale.WHITE
    if image.mode not in ("LA", "RGBA"):
        image = image.convert("RGBA")
    la = np.asarray(image.convert("LA"), dtype=np.uint16)
    luma, alpha = la[..., 0], la[..., 1]
    composited = (luma * alpha + backdrop * (255 - alpha) + 127) // 255
    return composited.astype(np.uint8)


def mnist_layout(gray: Gray) -> Gray:
    gray = imaging.dark_background(gray)
    # Issue #18 changed which 28×28 images pass through (before: all of them). That rule is not
    # what this reference is for, so it asks the module's own: the comparison stays on the
    # strips and lookup tables, and now covers the 28×28 images that are laid out as well.
    if gray.shape == (28, 28) and imaging.in_mnist_layout(gray):
        return gray
    ink = _ink(gray)
    if ink is None:
        return np.zeros((28, 28), dtype=np.uint8)
    return imaging._centre_by_mass(imaging._fit_box(ink))


def _ink(gray: Gray) -> Gray | None:
    border = imaging._border(gray).astype(np.float32)
    background = float(np.median(border))
    noise = imaging.MAD_TO_SIGMA * float(np.median(np.abs(border - background)))
    top = float(gray.max())
    if top - background < imaging.MIN_CONTRAST:
        return None
    cut = background + max(imaging.INK_FRACTION * (top - background), imaging.NOISE_SIGMAS * noise)
    mask = gray > cut
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    crop = gray[box]
    if background > 0 or top < 255:
        scale = 255.0 / (top - background)
        stretched = (crop.astype(np.float32) - background) * scale
        crop = np.clip(np.rint(stretched), 0, 255).astype(np.uint8)
    return np.where(mask[box], crop, 0).astype(np.uint8)
