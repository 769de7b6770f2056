"""Any image → MNIST's layout: formats, polarity, the 20 px box, centring by mass, refusals."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps, PngImagePlugin
from torchvision.datasets import MNIST

from service.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from service.serving import imaging
from service.serving.predictor import image_to_tensor, pixels_to_tensor
from service.settings import IMAGE_PIXELS_CEILING
from tests.service.images import (
    EXTRA_VARIANTS,
    SVG,
    TEXT,
    TUTORIAL,
    encode,
    png,
    png_claiming_size,
    rgba_png,
)
from tests.support import synthetic_digits


def layout(data: bytes) -> np.ndarray:
    field: np.ndarray = imaging.mnist_layout(imaging.decode(data))
    return field


def a_digit() -> np.ndarray:
    """A 28×28 MNIST-like digit: a thick ring, bright on black."""
    y, x = np.mgrid[0:28, 0:28]
    radius = np.hypot(y - 14, x - 14)
    ring: np.ndarray = np.clip((1 - np.abs(radius - 7) / 3) * 255, 0, 255).astype(np.uint8)
    return ring


def ink_box(field: np.ndarray) -> tuple[int, int]:
    rows = np.flatnonzero(field.any(axis=1))
    cols = np.flatnonzero(field.any(axis=0))
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def centre_of_mass(field: np.ndarray) -> tuple[float, float]:
    weights = field.astype(np.float64)
    total = weights.sum()
    return (
        float((weights.sum(axis=1) * np.arange(28)).sum() / total),
        float((weights.sum(axis=0) * np.arange(28)).sum() / total),
    )


@pytest.mark.real_data
def test_real_mnist_test_digits_pass_through_bit_for_bit(real_mnist: object) -> None:
    dataset = MNIST(str(real_mnist), train=False, download=False)
    for i in range(0, 10_000, 5):  # 2000 digits spread over the test split
        image, _ = dataset[i]
        assert torch.equal(image_to_tensor(encode(image))[0], TUTORIAL(image)), i


@pytest.mark.real_data
def test_every_mnist_image_is_taken_as_laid_out(real_mnist: Path) -> None:
    """The 28×28 rule against all 70,000 official images: none would be laid out again, so
    every one gives the tutorial's tensor (the test above checks that tensor on 2,000)."""
    raw = real_mnist / "MNIST" / "raw"
    for split in ("train", "t10k"):
        data = (raw / f"{split}-images-idx3-ubyte").read_bytes()
        images = np.frombuffer(data, np.uint8, offset=16).reshape(-1, 28, 28)
        assert len(images) == {"train": 60_000, "t10k": 10_000}[split]
        moved = [i for i, image in enumerate(images) if not imaging.in_mnist_layout(image)]
        assert moved == [], f"{split}: {len(moved)} MNIST images would be laid out again"


def test_the_generated_digits_are_in_mnists_layout() -> None:
    """The suite's stand-in data passes through predict as MNIST's digits do."""
    images, _ = synthetic_digits(2000, seed=18)
    assert all(imaging.in_mnist_layout(image) for image in images)
    assert all(np.array_equal(imaging.mnist_layout(image), image) for image in images[:200])


def test_28x28_digits_in_any_accepted_format_and_polarity_are_exact() -> None:
    digit = synthetic_digits(1, seed=7)[0][0]
    expected = TUTORIAL(Image.fromarray(digit))
    rgb = Image.fromarray(digit).convert("RGB")
    exact = {
        "png": png(digit),
        "inverted png": png(255 - digit),
        "rgba png (black ink, alpha = the digit)": rgba_png(digit, np.random.default_rng(0)),
        "la png (white ink on transparent over black)": png(
            np.dstack([digit, np.full_like(digit, 255)])
        ),
        "rgb png": encode(rgb),
        "bmp": encode(Image.fromarray(digit), "BMP"),
        "gif": encode(Image.fromarray(digit), "GIF"),
        "lossless webp": encode(Image.fromarray(digit), "WEBP", lossless=True),
        "16-bit png": encode(Image.fromarray(digit.astype(np.uint16) * 257)),
    }
    for name, data in exact.items():
        assert torch.equal(image_to_tensor(data)[0], expected), name


def test_a_gif_is_read_from_its_first_frame() -> None:
    first, second = a_digit(), np.zeros((28, 28), np.uint8)
    second[:, 10:14] = 255
    frames = [Image.fromarray(first), Image.fromarray(second)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    assert np.array_equal(layout(data), first)


def test_json_pixels_are_exact_and_inverted_when_light() -> None:
    digit = synthetic_digits(1, seed=8)[0][0]
    expected = TUTORIAL(Image.fromarray(digit))
    assert torch.equal(pixels_to_tensor(digit.tolist())[0], expected)
    assert torch.equal(pixels_to_tensor((255 - digit).astype(float).tolist())[0], expected)


def test_a_large_drawing_is_cropped_scaled_to_20px_and_centred_by_mass() -> None:
    canvas = np.full((400, 600), 250, np.uint8)  # white paper
    canvas[50:170, 400:460] = 40  # a dark bar, 120 tall and 60 wide, off-centre
    field = layout(png(canvas))
    assert field.shape == (28, 28) and field.dtype == np.uint8
    assert ink_box(field) == (20, 10)  # the longer side is 20 px, the aspect ratio kept
    assert field.max() == 255 and field[0].max() == 0  # light ink on a black field
    com_y, com_x = centre_of_mass(field)
    assert abs(com_y - 14) <= 0.5 and abs(com_x - 14) <= 0.5


def test_a_small_digit_is_scaled_up_to_the_20px_box() -> None:
    canvas = np.zeros((100, 100), np.uint8)
    canvas[10:18, 70:74] = 255
    assert ink_box(layout(png(canvas))) == (20, 10)


def test_an_mnist_digit_scaled_up_comes_back_close_to_itself() -> None:
    digit = a_digit()  # a ring centred in 28×28: nearly MNIST's layout already
    big = encode(Image.fromarray(digit).resize((112, 112), Image.Resampling.BICUBIC))
    back = layout(big).astype(np.float64)
    assert np.corrcoef(back.ravel(), digit.astype(np.float64).ravel())[0, 1] > 0.9


def test_a_noisy_photo_is_cropped_to_the_ink_not_the_noise() -> None:
    digit = a_digit()
    photo = EXTRA_VARIANTS["phone_photo"](digit, np.random.default_rng(1))
    assert Image.open(io.BytesIO(photo)).size == (600, 400)
    field = layout(photo).astype(np.float64)
    assert ink_box(field > 0) == (20, 20)
    assert np.corrcoef(field.ravel(), digit.astype(np.float64).ravel())[0, 1] > 0.9


def test_the_exif_orientation_of_a_photo_is_applied() -> None:
    canvas = np.full((300, 200), 255, np.uint8)
    canvas[50:250, 90:110] = 0  # a tall bar as stored...
    exif = Image.Exif()
    exif[0x0112] = 6  # ...shown rotated by 90°: a wide bar
    data = encode(Image.fromarray(canvas), "JPEG", exif=exif)
    height, width = ink_box(layout(data))
    assert width == 20 and height < 5


XMP_ROTATED = (
    '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
    'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description '
    'xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
)


def _rotated_exif() -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = 6
    return exif


def _xmp_png_info() -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", XMP_ROTATED)
    return info


@pytest.mark.parametrize(
    ("fmt", "options"),
    [
        ("PNG", lambda: {"exif": _rotated_exif()}),
        ("WEBP", lambda: {"exif": _rotated_exif(), "lossless": True}),
        ("JPEG", lambda: {"xmp": XMP_ROTATED.encode()}),
        ("WEBP", lambda: {"xmp": XMP_ROTATED.encode(), "lossless": True}),
        ("PNG", lambda: {"pnginfo": _xmp_png_info()}),
    ],
    ids=["png-exif", "webp-exif", "jpeg-xmp", "webp-xmp", "png-xmp"],
)
def test_every_orientation_pillow_reads_is_applied(
    fmt: str, options: Callable[[], dict[str, Any]]
) -> None:
    canvas = np.zeros((20, 40), np.uint8)
    canvas[5:8, 2:30] = 255
    data = encode(Image.fromarray(canvas), fmt, **options())
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("L"))
    assert expected.shape == (40, 20)  # Pillow reads the orientation...
    assert np.array_equal(imaging.decode(data), expected)  # ...and so does decode


def test_a_big_jpeg_is_decoded_at_reduced_scale() -> None:
    canvas = np.full((2400, 3200), 255, np.uint8)
    canvas[600:1800, 1400:1700] = 0
    gray = imaging.decode(encode(Image.fromarray(canvas).convert("RGB"), "JPEG"))
    assert gray.shape == (300, 400)  # 1/8 scale: both sides still ≥ 256 px
    assert ink_box(imaging.mnist_layout(gray)) == (20, 5)


def test_blank_and_flat_images_give_an_empty_field() -> None:
    for data in (
        png(np.full((50, 40), 255, np.uint8)),
        png(np.full((50, 40), 0, np.uint8)),
        png(np.full((50, 40), 120, np.uint8) + np.eye(50, 40, dtype=np.uint8) * 10),
        encode(Image.new("RGBA", (30, 30), (0, 0, 0, 0))),
    ):
        assert not layout(data).any()


def test_formats_other_than_the_accepted_ones_are_415_naming_them() -> None:
    tiff = encode(Image.fromarray(a_digit()), "TIFF")
    for data in (SVG, TEXT, tiff):
        with pytest.raises(UnsupportedMediaType) as caught:
            imaging.decode(data)
        assert "PNG, JPEG, BMP, GIF (first frame), WebP" in caught.value.message


def test_empty_and_corrupt_images_are_422() -> None:
    with pytest.raises(InvalidInput, match="empty"):
        imaging.decode(b"")
    noisy = png(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    middle = len(noisy) // 2
    scrambled = (
        noisy[:middle] + bytes(255 - b for b in noisy[middle : middle + 64]) + noisy[middle + 64 :]
    )
    for broken in (noisy[:middle], noisy[:60], scrambled):
        with pytest.raises(InvalidInput, match="truncated or corrupt"):
            imaging.decode(broken)
    jpeg = encode(Image.fromarray(a_digit()), "JPEG")
    with pytest.raises(InvalidInput):
        imaging.decode(jpeg[:200])


def test_a_damaged_header_of_an_accepted_format_is_422_naming_it_in_our_words() -> None:
    # Pillow cannot open them, but their signature is an accepted format's: damaged images
    # (422), not another format (415); and the client reads no decoder's message.
    digit = png(a_digit())
    bad_crc = digit[:29] + bytes([digit[29] ^ 0xFF]) + digit[30:]  # IHDR's checksum
    gif = encode(Image.fromarray(a_digit()), "GIF")
    for data, name in ((digit[:8], "PNG"), (bad_crc, "PNG"), (gif[:13], "GIF")):
        with pytest.raises(InvalidInput) as caught:
            imaging.decode(data)
        assert caught.value.message == (
            f"the {name} image's header could not be read (truncated or corrupt)"
        )
    jpeg = encode(Image.fromarray(a_digit()), "JPEG")
    for broken in (digit[: len(digit) // 2], jpeg[:200]):
        with pytest.raises(InvalidInput) as caught:
            imaging.decode(broken)
        assert caught.value.message in (  # our words only, wherever it failed
            "the image header could not be read (truncated or corrupt)",
            "the image could not be decoded (truncated or corrupt)",
        )


def test_a_16_bit_png_with_a_transparent_level_is_composited_on_white() -> None:
    # tRNS names one 16-bit level see-through: it is white, as alpha is everywhere else.
    canvas = np.full((28, 28), 0, np.uint16)
    canvas[6:22, 12:16] = 257  # near-black ink; the rest (0) transparent
    image = Image.fromarray(canvas)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", transparency=0)
    gray = imaging.decode(buffer.getvalue())
    assert gray[0, 0] == 255 and gray[10, 13] == 1


def test_images_with_too_many_pixels_are_refused_before_decoding() -> None:
    bomb = png_claiming_size(20_000, 20_000)  # 400 Mpx claimed in a few dozen bytes
    assert len(bomb) < 100
    with pytest.raises(PayloadTooLarge, match="pixels"):
        imaging.decode(bomb)
    with pytest.raises(PayloadTooLarge, match="at most 10000 pixels"):
        imaging.decode(png(np.zeros((101, 100), np.uint8)), max_pixels=10_000)
    assert imaging.decode(png(np.zeros((100, 100), np.uint8)), max_pixels=10_000).shape == (
        100,
        100,
    )
    # Pillow's own guard in this process is far below its default of 89 Mpx.
    assert Image.MAX_IMAGE_PIXELS == IMAGE_PIXELS_CEILING < 89_000_000


def test_an_image_longer_than_a_side_allows_is_413_before_decoding() -> None:
    # A few pixels by millions: Pillow's rows alone would hold 8 bytes each.
    for width, height in ((imaging.MAX_SIDE_PX + 1, 1), (1, imaging.MAX_SIDE_PX + 1)):
        with pytest.raises(PayloadTooLarge, match=f"at most {imaging.MAX_SIDE_PX} on a side"):
            imaging.decode(png_claiming_size(width, height))
    assert imaging.decode(png(np.zeros((1, imaging.MAX_SIDE_PX), np.uint8))).shape == (
        1,
        imaging.MAX_SIDE_PX,
    )


def jpeg_bytes(image: Image.Image, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90, **options)
    return out.getvalue()


@pytest.mark.parametrize(
    ("mode", "progressive", "scans"),
    [("L", False, 1), ("RGB", False, 1), ("L", True, 6), ("RGB", True, 10)],
)
def test_a_jpegs_scans_are_counted_from_its_markers(
    mode: str, progressive: bool, scans: int
) -> None:
    photo = Image.fromarray(np.random.default_rng(1).integers(0, 255, (90, 120, 3), np.uint8))
    data = jpeg_bytes(photo.convert(mode), progressive=progressive, restart_marker_blocks=4)
    assert b"\xff\xd0" in data  # restart markers inside the scans: not counted
    assert imaging.jpeg_scans(data, most=imaging.MAX_JPEG_SCANS) == scans
    # Another JPEG inside an APP1 segment (as an EXIF thumbnail is): not the image's scans.
    inner = jpeg_bytes(photo, progressive=True)
    app1 = b"\xff\xe1" + (len(inner) + 2).to_bytes(2, "big") + inner
    assert imaging.jpeg_scans(data[:2] + app1 + data[2:], most=imaging.MAX_JPEG_SCANS) == scans


def test_a_jpeg_of_too_many_scans_is_413_before_decoding() -> None:
    """A progressive JPEG's last scan repeated: each repeat a few bytes, each a pass over the
    whole image; 1,000 of them at 16 Mpx took 14 s of a decode slot."""
    data = jpeg_bytes(Image.new("L", (64, 64), 255), progressive=True)
    last_scan = data[data.rfind(b"\xff\xda") : -2]  # to the end-of-image marker

    def with_scans(total: int) -> bytes:
        return data[:-2] + last_scan * (total - 6) + data[-2:]

    most = imaging.MAX_JPEG_SCANS
    assert imaging.decode(with_scans(most)).shape == (64, 64)  # still decoded
    with pytest.raises(PayloadTooLarge, match=f"more than {most} scans"):
        imaging.decode(with_scans(most + 1))
    assert imaging.jpeg_scans(with_scans(10_000), most=most) == most + 1  # counting stops

    # The same as a camera's MPO (Pillow opens it as format "MPO"): its first image counted.
    mpo = io.BytesIO()
    white = Image.new("L", (64, 64), 255)
    white.save(mpo, "MPO", save_all=True, append_images=[white.copy()], progressive=True)
    first_end = mpo.getvalue().index(b"\xff\xd9") + 2
    first, rest = mpo.getvalue()[:first_end], mpo.getvalue()[first_end:]
    scan = first[first.rfind(b"\xff\xda") : -2]
    bomb = first[:-2] + scan * most + first[-2:] + rest
    assert Image.open(io.BytesIO(bomb)).format == "MPO"
    with pytest.raises(PayloadTooLarge, match=f"more than {most} scans"):
        imaging.decode(bomb)


@pytest.mark.parametrize("ink", [(0, 0, 255), (60, 60, 60), (255, 0, 0)], ids=str)
def test_a_faint_digit_on_a_28x28_canvas_is_laid_out_as_on_a_larger_one(
    ink: tuple[int, int, int],
) -> None:
    """Its ink's box and centre were MNIST's, so it passed as laid out, its faint ink never
    stretched: blue ink on black read 36% of the test digits right, the same drawings one
    pixel larger 95% (a review, on the MNIST test set)."""
    digit = synthetic_digits(1, seed=3)[0][0]
    tinted = (digit[..., None].astype(np.float32) / 255 * np.array(ink)).round().astype(np.uint8)
    larger = np.zeros((29, 29, 3), np.uint8)
    larger[:28, :28] = tinted
    field = layout(png(tinted))
    assert field.max() == 255  # stretched, as at any other size
    assert np.array_equal(field, layout(png(larger)))
    assert np.array_equal(layout(png(digit)), digit)  # an MNIST-like digit still passes as is
