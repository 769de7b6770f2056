"""Any digit image → MNIST's layout: a light digit on black, 20 px box, centred by mass in 28×28.

The steps follow how MNIST itself was made from NIST's scans (LeCun et al.): the digit's
bounding box is scaled to fit 20×20 keeping its aspect ratio, then placed in a 28×28 field
so that its centre of mass sits on the field's centre. Before that, photos and drawings are
brought to MNIST's polarity: colour becomes grayscale, alpha is composited on a backdrop the ink
stands out from (:mod:`service.serving.grayscale`), and a light background is inverted.
Everything here is numpy and Pillow on in-memory buffers.

A 28×28 image already laid out the MNIST way (:func:`in_mnist_layout`: its ink's box, centre
of mass and strongest level are where MNIST has them) gets only grayscale and polarity, so an
MNIST digit passes through bit for bit; any other 28×28 image (a digit touching an edge,
off-centre, too big, too small or faint) is laid out like an image of any other size.
"""

from __future__ import annotations

import io
import re
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from service.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from service.ml import IMAGE_SIDE_PX
from service.serving.grayscale import LIGHT_MIN, Gray, strip_rows, to_gray
from service.settings import IMAGE_PIXELS_CEILING, Settings

# Pillow's decoders the service opens; every other format is refused before decoding.
ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP")
ACCEPTED_FORMATS_TEXT = "PNG, JPEG, BMP, GIF (first frame), WebP"
# Pillow's own decompression-bomb guard for this process, far below its default (89 Mpx):
# it warns above this and refuses above twice this, whatever a setting says.
Image.MAX_IMAGE_PIXELS = IMAGE_PIXELS_CEILING
DEFAULT_MAX_IMAGE_PIXELS = Settings.model_fields["max_image_pixels"].default

DIGIT_BOX_PX = 20  # MNIST's digits fit a 20×20 box...
FIELD_CENTRE_PX = 14.0  # ...whose centre of mass lands on pixel 14 (measured: 14.00 ± 0.29)
# MNIST's layout as measured on all 70,000 images of the official files: the box of the non-zero
# pixels is 19 or 20 px on its longer side (20 in all but 16), and the centre of mass lies within
# 0.52 px of (14, 14) on either axis. A 28×28 field inside these bounds (1 px of slack above the
# box, and about 0.5 px around the centre) is taken as laid out; tests check every MNIST image.
LAID_OUT_SIDE_PX = (19, 21)
LAID_OUT_CENTRE_SLACK_PX = 1.0
# And the strongest ink of every one of them is 254 or 255: a fainter digit (a tinted or grey
# pen) is contrast-stretched as at any other size, or it read far worse than the same drawing
# one pixel larger (blue ink on black: 36% against 95% of the test digits).
LAID_OUT_TOP_INK = 254
# The longest side accepted, JPEG's and GIF's own limit: Pillow keeps 8 bytes for each row
# beside its pixels, and its decoders a few copies of one row, so an image of a few pixels by
# 16 million (a 15 kB upload) held several times what a square one of as many pixels does.
MAX_SIDE_PX = 65_535
# JPEG photos decode at 1/2, 1/4 or 1/8 scale while both sides stay at least this long:
# a digit needs far fewer pixels than a phone camera gives, and a reduced decode is much cheaper.
JPEG_DRAFT_MIN_SIDE_PX = 256
# A JPEG of more scans than this is refused before decoding. Each scan of a progressive JPEG
# passes over the whole image again, its reduced draft included, so a few bytes per repeated
# scan bought a decode of minutes (1,000 scans of 16 Mpx in 126 kB: 14 s). Encoders write
# about 10 (libjpeg's progression 10 in colour, 6 in gray), and baseline JPEGs 1 to 3.
MAX_JPEG_SCANS = 64
# A JPEG marker: 0xFF then a byte that is not 0x00 (a stuffed 0xFF in entropy-coded data),
# not a restart marker (0xD0-0xD7, which sit inside a scan) and not 0xFF (a fill byte).
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_JPEG_SOS, _JPEG_EOI, _JPEG_TEM = 0xDA, 0xD9, 0x01
# A field whose brightest pixel is within this of the background holds no digit.
MIN_CONTRAST = 24
# Ink is brighter than the background by this fraction of the contrast, and by this many
# standard deviations of the background's noise; the rest (paper texture, sensor noise, JPEG
# ringing) is set to black and does not widen the ink's box.
INK_FRACTION = 0.15
NOISE_SIGMAS = 6.0
MAD_TO_SIGMA = 1.4826  # median absolute deviation → standard deviation of a normal
# Where Pillow reads an orientation from (``Image.getexif``): EXIF, ImageMagick's PNG text
# chunk, XMP. An image with none of them is shown as stored.
ORIENTATION_SOURCES = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")


def decode(data: bytes, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Gray:
    """Image bytes → a 2-D uint8 grayscale array, alpha composited on white.

    Raises 422 for empty or undecodable data, 415 for a format not accepted, 413 for an
    image of more than ``max_pixels`` pixels (checked from the header, before decoding).
    """
    if not data:
        raise InvalidInput("the image is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError as exc:
        claimed = claimed_format(data)
        if claimed is not None:  # its signature is an accepted format's: a damaged header
            raise InvalidInput(
                f"the {claimed} image's header could not be read (truncated or corrupt)"
            ) from exc
        raise UnsupportedMediaType(
            f"the file is not an image in an accepted format; accepted: {ACCEPTED_FORMATS_TEXT}"
        ) from exc
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(f"the image has far more than {max_pixels} pixels") from exc
    except Exception as exc:  # a header Pillow cannot parse is the client's fault
        # The client is told what failed, not the decoder's words (Security, README).
        raise InvalidInput("the image header could not be read (truncated or corrupt)") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"the image is {width}×{height} pixels; at most {max_pixels} pixels are accepted"
        )
    if max(width, height) > MAX_SIDE_PX:
        raise PayloadTooLarge(
            f"the image is {width}×{height} pixels; at most {MAX_SIDE_PX} on a side are accepted"
        )
    if width == 0 or height == 0:
        raise InvalidInput(f"the image is {width}×{height} pixels: nothing to read")
    # A camera's MPO (several JPEGs in one file, the first shown) opens as a JPEG of its own.
    is_jpeg = isinstance(image, JpegImagePlugin.JpegImageFile)
    if is_jpeg and jpeg_scans(data, most=MAX_JPEG_SCANS) > MAX_JPEG_SCANS:
        raise PayloadTooLarge(
            f"the JPEG image has more than {MAX_JPEG_SCANS} scans (encoders write about 10)"
        )
    try:
        if is_jpeg:
            image.draft("L", (JPEG_DRAFT_MIN_SIDE_PX, JPEG_DRAFT_MIN_SIDE_PX))
        image.load()  # the first frame of a GIF or animated WebP
        return to_gray(_upright(image))
    # Pillow's decoders raise many types on corrupt input (OSError, SyntaxError, EOFError,
    # ValueError, zlib.error, struct.error…): all of them mean the bytes are not a valid image.
    except Exception as exc:
        raise InvalidInput("the image could not be decoded (truncated or corrupt)") from exc


def jpeg_scans(data: bytes, *, most: int) -> int:
    """How many scans (start-of-scan markers) a JPEG's bytes hold, counted up to ``most`` + 1.

    Segments are skipped by their length (an EXIF thumbnail's markers inside an APP1 segment
    are not the image's); a scan's entropy-coded data is searched for the next marker."""
    scans, at = 0, 2  # after the start-of-image marker
    while scans <= most and (found := _JPEG_MARKER.search(data, at)) is not None:
        marker, at = data[found.start() + 1], found.end()
        if marker == _JPEG_EOI:
            break
        if marker == _JPEG_TEM:  # the one other marker without a length
            continue
        scans += marker == _JPEG_SOS
        at += int.from_bytes(data[at : at + 2], "big")
    return scans


def claimed_format(data: bytes) -> str | None:
    """The accepted format whose signature ``data`` begins with, by Pillow's own test of each
    (``Image.OPEN``), or None: bytes that Pillow cannot open but that claim an accepted format
    are a damaged image (422), not an unaccepted one (415)."""
    Image.init()
    prefix = data[:16]
    return next((f for f in ACCEPTED_FORMATS if _accepts(f, prefix)), None)


def _accepts(image_format: str, prefix: bytes) -> bool:
    _, accept = Image.OPEN[image_format]
    return accept is not None and bool(accept(prefix))


def _upright(image: Image.Image) -> Image.Image:
    """The image as it is meant to be shown: its EXIF or XMP orientation applied."""
    if not any(source in image.info for source in ORIENTATION_SOURCES):
        # Most uploads: no metadata to parse (getexif) and no copy to make.
        return image
    return ImageOps.exif_transpose(image)


def _border(gray: NDArray[Any]) -> NDArray[Any]:
    """The outermost pixels: the background, unless the ink touches every edge."""
    return np.concatenate((gray[0], gray[-1], gray[1:-1, 0], gray[1:-1, -1]))


def _border_median(gray: NDArray[Any]) -> float:
    border = _border(gray)
    if border.dtype != np.uint8:
        return float(np.median(border))
    # np.median's value (the mean of the two middle values, in float64) without its overhead,
    # which is most of the cost of a 28×28 image's preprocessing.
    ordered = np.sort(border)
    n = len(ordered)
    return (float(ordered[(n - 1) // 2]) + float(ordered[n // 2])) / 2


def dark_background(gray: NDArray[Any]) -> NDArray[Any]:
    """MNIST's polarity: inverted when the background (the border's median) is light."""
    if _border_median(gray) >= LIGHT_MIN:
        return 255 - gray
    return gray


def mnist_layout(gray: Gray) -> Gray:
    """A 2-D uint8 grayscale image → MNIST's 28×28 uint8 layout (see the module docstring)."""
    if gray.shape == (IMAGE_SIDE_PX, IMAGE_SIDE_PX):
        field = dark_background(gray)
        if in_mnist_layout(field):
            return field
    ink = _ink(gray, inverted=_border_median(gray) >= LIGHT_MIN)
    if ink is None:
        return np.zeros((IMAGE_SIDE_PX, IMAGE_SIDE_PX), dtype=np.uint8)
    return _centre_by_mass(_fit_box(ink))


def in_mnist_layout(field: NDArray[Any]) -> bool:
    """Whether a 28×28 field in MNIST's polarity is laid out as MNIST's digits are.

    Its non-zero pixels' box is :data:`LAID_OUT_SIDE_PX` long on its longer side, its centre
    of mass within :data:`LAID_OUT_CENTRE_SLACK_PX` of (14, 14) and its strongest pixel at
    least :data:`LAID_OUT_TOP_INK`, as every MNIST image's are. A blank field is too: there is
    nothing to move. A digit drawn on a 28×28 canvas too big, too
    small or off-centre (as one touching an edge mostly is) is not, and a model trained on MNIST
    misreads it unless it is laid out first (issue #18: 3 of 20 drawn digits read right).
    """
    ink_rows, ink_cols = np.flatnonzero(field.any(axis=1)), np.flatnonzero(field.any(axis=0))
    if ink_rows.size == 0:
        return True
    if field.max() < LAID_OUT_TOP_INK:
        return False
    longer = max(ink_rows[-1] - ink_rows[0], ink_cols[-1] - ink_cols[0]) + 1
    low, high = LAID_OUT_SIDE_PX
    if not low <= longer <= high:
        return False
    com_y, com_x = _centre_of_mass(field)
    slack = LAID_OUT_CENTRE_SLACK_PX
    return abs(com_y - FIELD_CENTRE_PX) <= slack and abs(com_x - FIELD_CENTRE_PX) <= slack


def _ink(gray: Gray, *, inverted: bool) -> Gray | None:
    """The ink cropped to its bounding box, background at 0 and the strongest ink at 255.

    The background's level and noise are read from the border (median, and median absolute
    deviation); ink is what stands out from both, so paper texture and sensor noise in a
    photo do not stretch the box to the whole picture.

    ``inverted``: the image is light on dark the other way round (:func:`dark_background`).
    Polarity, the ink threshold and the contrast stretch each map a pixel's level alone, so
    they are composed into one 256-entry table: the image is read through it a strip at a time
    to find the ink's box, then the box alone is mapped, so a large image costs no inverted
    copy, mask or float32 copies, only its ink's box in 8 bits.
    """
    stored = _border(gray)
    border = (255 - stored if inverted else stored).astype(np.float32)
    background = float(np.median(border))
    noise = MAD_TO_SIGMA * float(np.median(np.abs(border - background)))
    top = float(255 - gray.min()) if inverted else float(gray.max())
    if top - background < MIN_CONTRAST:
        return None
    cut = background + max(INK_FRACTION * (top - background), NOISE_SIGMAS * noise)
    levels = np.arange(256, dtype=np.uint8)
    shown = 255 - levels if inverted else levels  # what each stored level means
    value = shown
    if background > 0 or top < 255:
        scale = 255.0 / (top - background)
        stretched = (shown.astype(np.float32) - background) * scale
        value = np.clip(np.rint(stretched), 0, 255).astype(np.uint8)
    # Every level above the cut maps to at least 15% of 255, so "non-zero" is "ink".
    table = np.where(shown > cut, value, 0).astype(np.uint8)
    # The ink's rows and columns, a strip at a time; then only the ink's box is mapped.
    ink_rows = np.zeros(gray.shape[0], dtype=bool)
    ink_cols = np.zeros(gray.shape[1], dtype=bool)
    rows_per_strip = strip_rows(gray.shape[1])
    for first in range(0, gray.shape[0], rows_per_strip):
        strip = table[gray[first : first + rows_per_strip]]
        ink_rows[first : first + rows_per_strip] = strip.any(axis=1)
        ink_cols |= strip.any(axis=0)
    rows, cols = np.flatnonzero(ink_rows), np.flatnonzero(ink_cols)
    if rows.size == 0:
        return None
    return table[gray[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]]


def _fit_box(ink: Gray) -> Gray:
    """Scale so the longer side is 20 px, keeping the aspect ratio (antialiased)."""
    height, width = ink.shape
    longer = max(height, width)
    size = (
        max(1, round(width * DIGIT_BOX_PX / longer)),
        max(1, round(height * DIGIT_BOX_PX / longer)),
    )
    if size == (width, height):
        return ink
    # reducing_gap: a large image is first box-reduced, which is faster and as sharp at 20 px.
    resized = Image.fromarray(ink).resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.asarray(resized, dtype=np.uint8)


def _centre_by_mass(digit: Gray) -> Gray:
    """Paste into a black 28×28 field so the centre of mass lands on the field's centre."""
    height, width = digit.shape
    field = np.zeros((IMAGE_SIDE_PX, IMAGE_SIDE_PX), dtype=np.uint8)
    if not digit.any():
        return field
    com_y, com_x = _centre_of_mass(digit)
    # Shifts by whole pixels, as MNIST did; clamped so no ink falls off the field.
    top = min(max(round(FIELD_CENTRE_PX - com_y), 0), IMAGE_SIDE_PX - height)
    left = min(max(round(FIELD_CENTRE_PX - com_x), 0), IMAGE_SIDE_PX - width)
    field[top : top + height, left : left + width] = digit
    return field


def _centre_of_mass(image: NDArray[Any]) -> tuple[float, float]:
    """(row, column) of an image's centre of mass, its pixels' values the weights (not blank)."""
    height, width = image.shape
    weights = image.astype(np.float64)
    total = float(weights.sum())
    return (
        float(weights.sum(axis=1) @ np.arange(height)) / total,
        float(weights.sum(axis=0) @ np.arange(width)) / total,
    )


def pixels_layout(pixels: NDArray[np.float32]) -> NDArray[np.float32]:
    """A 28×28 array of values in 0–255 in MNIST's polarity (inverted when light)."""
    flipped: NDArray[np.float32] = dark_background(pixels)
    return flipped
