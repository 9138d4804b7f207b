"""Decoding by content: every common format and mode becomes upright RGB; bad files get clear errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from imageclf.errors import BadImageError, ImageTooLargeError
from imageclf.images import decode_image

RED = (200, 30, 20)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def red_image(mode: str = "RGB", size=(40, 30)) -> Image.Image:
    return Image.new("RGB", size, RED).convert(mode)


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "BMP", "WEBP", "TIFF"])
def test_formats_decode_to_rgb(fmt):
    pixels = decode_image(encode(red_image(), fmt, **({"lossless": True} if fmt == "WEBP" else {})))
    assert pixels.shape == (30, 40, 3) and pixels.dtype == np.uint8
    assert np.abs(pixels.astype(int) - RED).max() <= 12  # GIF quantises colours a little


def test_jpeg_named_png_is_decoded_by_content():
    pixels = decode_image(encode(red_image(), "JPEG", quality=95), name="photo.png")
    assert np.abs(pixels.astype(int) - RED).max() <= 6


def test_grayscale_becomes_three_equal_channels():
    pixels = decode_image(encode(Image.new("L", (8, 8), 77), "PNG"))
    assert pixels.shape == (8, 8, 3) and (pixels == 77).all()


def test_rgba_drops_alpha():
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    assert (decode_image(encode(rgba, "PNG")) == (10, 20, 30)).all()


def test_cmyk_jpeg():
    pixels = decode_image(encode(red_image("CMYK"), "JPEG", quality=95))
    assert pixels.shape == (30, 40, 3)
    assert np.abs(pixels.astype(int) - RED).max() <= 12


def test_sixteen_bit_png_is_scaled_not_clipped():
    wide = Image.fromarray(np.full((6, 6), 32768, dtype=np.uint16))
    pixels = decode_image(encode(wide, "PNG"))
    assert (pixels == 128).all()


def test_exif_rotation_is_applied():
    img = Image.new("RGB", (40, 20), RED)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    pixels = decode_image(encode(img, "JPEG", exif=exif.tobytes()))
    assert pixels.shape == (40, 20, 3)


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert decode_image(data)[0, 0, 0] > 200


@pytest.mark.parametrize("data, message", [
    (b"", "empty file"),
    (b"hello, I am a text file\n" * 10, "not an image"),
    (encode(red_image(size=(300, 300)), "JPEG")[:400], "truncated or corrupt"),
    (encode(red_image(size=(300, 300)), "PNG")[:-30], "truncated or corrupt"),
])
def test_bad_files_raise_clear_errors(data, message):
    with pytest.raises(BadImageError, match=message) as info:
        decode_image(data, name="upload.jpg")
    assert str(info.value).startswith("upload.jpg: ")


@pytest.mark.parametrize("side", [5_000, 20_000])
def test_pixel_bomb_refused_before_decoding(side):
    # A blank 20000x20000 PNG is a few hundred KB; decoding it would take 400 MB or more.
    bomb = encode(Image.new("L", (side, side)), "PNG")
    with pytest.raises(ImageTooLargeError, match="over the limit"):
        decode_image(bomb, max_pixels=10_000_000)
