"""Alpha composited on a backdrop the ink stands out from."""

from __future__ import annotations

import numpy as np
from PIL import Image

from service.serving import imaging
from tests.service.images import encode
from tests.support import synthetic_digits


def layout(image: Image.Image) -> np.ndarray:
    field: np.ndarray = imaging.mnist_layout(imaging.decode(encode(image)))
    return field


def on_transparency(digit: np.ndarray, level: int) -> Image.Image:
    """The digit as ink of one ``level`` whose shape is its alpha, as a drawing app exports it."""
    ink = np.full(digit.shape, level, np.uint8)
    return Image.fromarray(np.dstack([ink, ink, ink, digit]), "RGBA")


def test_light_ink_on_transparency_reads_as_dark_ink_does() -> None:
    """White ink (a dark-themed drawing) vanished on the white backdrop: every such image read
    as blank, the same digit with p = 0.38 whatever was drawn."""
    digit = synthetic_digits(1, seed=4)[0][0]
    for level in (0, 255):  # black ink, white ink: the digit itself
        assert np.array_equal(layout(on_transparency(digit, level)), digit), level
    pale = layout(on_transparency(digit, 200))
    assert pale.max() == 255 and np.array_equal(pale > 0, layout(on_transparency(digit, 60)) > 0)
    white, black = (
        on_transparency(digit, level).resize((280, 280), Image.Resampling.NEAREST)
        for level in (255, 0)
    )
    assert np.array_equal(layout(white), layout(black))


def test_a_drawing_with_a_paper_of_its_own_keeps_the_white_backdrop() -> None:
    """Dark ink on an opaque white sheet, with transparent margins: the sheet is background,
    not ink, as it is once flattened on white."""
    digit = synthetic_digits(1, seed=5)[0][0]
    sheet = np.zeros((40, 40, 4), np.uint8)
    sheet[6:34, 6:34, :3] = 255 - digit[..., None]  # black ink on white paper
    sheet[6:34, 6:34, 3] = 255
    flattened = np.full((40, 40), 255, np.uint8)
    flattened[6:34, 6:34] = 255 - digit
    field = layout(Image.fromarray(sheet, "RGBA"))
    assert field.any() and np.array_equal(field, layout(Image.fromarray(flattened)))
