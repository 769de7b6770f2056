"""Digits drawn on a 28×28 canvas, but not where MNIST puts its digits, are read right (#18).

Twenty digits typeset with PIL in DejaVu fonts, each touching an edge, off-centre, too big or
too small on a 28×28 canvas. Taken as already laid out they were read by a 60,000-image model
as 3 of 20; laid out first (crop to the ink, 20 px box, centre of mass at (14, 14)) the goal is
at least 18. Needs the official files (the model) and the DejaVu fonts (Debian's
fonts-dejavu-core; ``.ci/run`` installs it): skips, saying which is missing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from service.ml import SimpleMLP, normalization_table, normalize_uint8
from service.serving import imaging
from service.serving.predictor import image_to_tensor
from tests.service.images import png

pytestmark = pytest.mark.real_data

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSansCondensed.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSerifCondensed.ttf",
)
GOAL = 18  # of 20
# How each digit misses MNIST's layout: the glyph's height in px, and where its box goes.
PLACEMENTS = ("touching an edge", "off-centre", "too big", "too small")
GLYPH_HEIGHT_PX = {"touching an edge": 20, "off-centre": 16, "too big": 27, "too small": 9}


def _font(name: str, glyph_height_px: int, digit: str) -> ImageFont.FreeTypeFont:
    """The font at the size whose ``digit`` is about ``glyph_height_px`` tall."""
    size = glyph_height_px
    font = ImageFont.truetype(str(FONT_DIR / name), size)
    _, top, _, bottom = font.getbbox(digit)
    size = max(4, round(size * glyph_height_px / (bottom - top)))
    return ImageFont.truetype(str(FONT_DIR / name), size)


def draw(digit: int, font_name: str, placement: str) -> np.ndarray:
    """A light ``digit`` on a black 28×28 canvas, placed as ``placement`` says."""
    text = str(digit)
    font = _font(font_name, GLYPH_HEIGHT_PX[placement], text)
    left, top, right, bottom = font.getbbox(text)
    width, height = right - left, bottom - top
    if placement == "touching an edge":  # flush with the right edge, low on the canvas
        x, y = 28 - width, 28 - height - 1
    elif placement == "off-centre":  # in the top-left corner, 1 px in
        x, y = 1, 1
    else:  # centred by box: too big overflows MNIST's 4 px margin, too small fills little
        x, y = (28 - width) // 2, (28 - height) // 2
    canvas = Image.new("L", (28, 28), 0)
    ImageDraw.Draw(canvas).text((x - left, y - top), text, fill=255, font=font)
    return np.asarray(canvas, dtype=np.uint8)


def drawn_digits() -> list[tuple[str, int, np.ndarray]]:
    """(description, digit, 28×28 image): 0–9 twice, each font and placement five times."""
    if not FONT_DIR.is_dir() or any(not (FONT_DIR / f).exists() for f in FONTS):
        pytest.skip(f"drawn-digit test: DejaVu fonts missing under {FONT_DIR} (fonts-dejavu-core)")
    drawn = []
    for i in range(20):
        digit, font, placement = i % 10, FONTS[i % 4], PLACEMENTS[(i + i // 10) % 4]
        drawn.append((f"{digit} in {font}, {placement}", digit, draw(digit, font, placement)))
    return drawn


@pytest.fixture(scope="session")
def mnist_model(real_mnist: Path) -> SimpleMLP:
    """The tutorial's model and loop (Adam 1e-3, batch 64) on all 60,000 training images,
    2 epochs, seeded: ~97 % on the test split, trained once per session.

    On one thread: in ~20 s of CPU, where the default thread pool took minutes on a shared
    2-core host; and the same weights on every machine with the same torch.
    """
    raw = real_mnist / "MNIST" / "raw"
    images = np.frombuffer((raw / "train-images-idx3-ubyte").read_bytes(), np.uint8, offset=16)
    labels = np.frombuffer((raw / "train-labels-idx1-ubyte").read_bytes(), np.uint8, offset=8)
    x = normalize_uint8(torch.from_numpy(images.reshape(-1, 28, 28).copy()))
    y = torch.from_numpy(labels.astype(np.int64))
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = SimpleMLP()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(2):
            order = torch.randperm(len(y), generator=generator)
            for start in range(0, len(y), 64):
                batch = order[start : start + 64]
                optimiser.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
                loss.backward()  # type: ignore[no-untyped-call]
                optimiser.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def predict(model: SimpleMLP, field: np.ndarray) -> int:
    """The model's digit for a field taken as it is."""
    with torch.inference_mode():
        return int(model(torch.from_numpy(normalization_table()[field])[None, None]).argmax())


def read(model: SimpleMLP, field: np.ndarray) -> int:
    """The model's digit for the field sent as a PNG, as the API reads it."""
    with torch.inference_mode():
        return int(model(image_to_tensor(png(field))).argmax())


def test_drawn_digits_off_mnists_layout_are_laid_out_and_read_right(
    mnist_model: SimpleMLP,
) -> None:
    drawn = drawn_digits()
    # The premise: none of them is in MNIST's layout, so each goes through it.
    assert [name for name, _, field in drawn if imaging.in_mnist_layout(field)] == []
    wrong = [
        (name, got) for name, digit, field in drawn if (got := read(mnist_model, field)) != digit
    ]
    # Passed through as they are (what a 28×28 image got before): what the layout is for.
    as_is = sum(predict(mnist_model, field) == digit for _, digit, field in drawn)
    print(f"drawn digits read right: {20 - len(wrong)} of 20 (passed through as they are: {as_is})")
    assert 20 - len(wrong) >= GOAL, f"read wrong: {wrong}"
