"""A decoded image → 2-D uint8 grayscale: 16-bit levels, colour and alpha, a strip at a time.

Alpha is composited on a backdrop that the ink stands out from: white, unless every pixel
that shows is light (white or pale ink on transparency, as a dark-themed drawing exports it),
which would vanish on white and is composited on black. Either way the layout's polarity step
(:func:`service.serving.imaging.dark_background`) then finds the background.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import numpy as np
from numpy.typing import NDArray
from PIL import Image

Gray = NDArray[np.uint8]

# A light level: a background whose border's median is at least this bright is inverted, and
# ink of only such levels on transparency is composited on black.
LIGHT_MIN = 128
WHITE, BLACK = 255, 0
# Pixels converted to 8-bit grayscale, or searched for ink, at a time (:func:`to_gray`,
# ``imaging._ink``): 256 rows of a 4096-pixel-wide image, a few MB of intermediates for any
# image accepted, however wide (it was 256 rows, whatever their width), and few strips for a
# tall one.
STRIP_PX = 256 * 4096


def to_gray(image: Image.Image) -> Gray:
    """The image as 2-D uint8 grayscale, converted a strip of rows at a time.

    Every conversion here is pixel by pixel, so strips give exactly the whole image's result,
    while the wide intermediates (16-bit values, luma and alpha) only ever exist for
    :data:`STRIP_PX` pixels: a large image costs its decoded self and its 8-bit copy, not
    several copies in wider types.
    """
    width, height = image.size
    convert = _strip_converter(image)
    if height <= strip_rows(width):  # most uploads: one strip, no copy of it to make
        return convert(image)
    gray = np.empty((height, width), dtype=np.uint8)
    for top, strip in _strips(image):
        gray[top : top + strip.size[1]] = convert(strip)
    return gray


def strip_rows(width: int) -> int:
    """How many rows of an image this wide a strip holds (at least 16: a row has at most
    65,535 pixels)."""
    return max(1, STRIP_PX // max(width, 1))


def _strips(image: Image.Image) -> Iterator[tuple[int, Image.Image]]:
    """The image's strips of :func:`strip_rows` rows, with their first row; the image itself
    when it is one strip."""
    width, height = image.size
    rows = strip_rows(width)
    if height <= rows:
        yield 0, image
        return
    for top in range(0, height, rows):
        yield top, image.crop((0, top, width, min(top + rows, height)))


def _strip_converter(image: Image.Image) -> Callable[[Image.Image], Gray]:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grayscale PNG
        clear = image.info.get("transparency")  # tRNS: the one 16-bit level that is see-through
        return functools.partial(_sixteen_bit, clear=clear if isinstance(clear, int) else None)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if not has_alpha:
        return _luma
    return functools.partial(_composited, backdrop=BLACK if _only_light_shows(image) else WHITE)


def _sixteen_bit(strip: Image.Image, *, clear: int | None) -> Gray:
    # round(v / 257) (the nearest 8-bit level), clipped to 0–255, in integers: v / 257 is never
    # exactly halfway between two levels, so (v + 128) // 257 is that rounding.
    wide = np.asarray(strip, dtype=np.int32)
    gray = ((np.clip(wide, 0, 65535) + 128) // 257).astype(np.uint8)
    if clear is not None:  # composited on white as any image with alpha: that level is white
        gray[wide == clear] = 255
    return gray


def _luma(strip: Image.Image) -> Gray:
    return np.asarray(strip if strip.mode == "L" else strip.convert("L"), dtype=np.uint8)


def _luma_alpha(strip: Image.Image) -> tuple[NDArray[np.uint16], NDArray[np.uint16]]:
    if strip.mode not in ("LA", "RGBA"):
        strip = strip.convert("RGBA")
    la = np.asarray(strip.convert("LA"), dtype=np.uint16)
    return la[..., 0], la[..., 1]


def _only_light_shows(image: Image.Image) -> bool:
    """Whether every pixel that shows at all (alpha above 0) is light: white or pale ink whose
    shape is its alpha. On white it vanished, and the image read as blank (a confident wrong
    digit). A drawing with any dark pixel (dark ink, or a paper of its own with ink on it)
    keeps the white backdrop."""
    for _, strip in _strips(image):
        luma, alpha = _luma_alpha(strip)
        if (luma[alpha > 0] < LIGHT_MIN).any():
            return False
    return True


def _composited(strip: Image.Image, *, backdrop: int) -> Gray:
    luma, alpha = _luma_alpha(strip)
    # luma·α + backdrop·(1 − α), rounded (≤ 65,152: uint16 holds it); black ink of opacity α
    # over white gives exactly 255 − α, and white ink over black exactly α.
    return ((luma * alpha + backdrop * (255 - alpha) + 127) // 255).astype(np.uint8)
