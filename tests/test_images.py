"""Decoding by content: every common format and mode becomes upright RGB; bad files get clear errors."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps, PngImagePlugin

from imageclf.errors import BadImageError, ImageTooLargeError, NotAnImageError
from imageclf.images import (
    ALLOWED_FORMATS,
    decode_image,
    decode_opened,
    decoded_nbytes,
    open_image,
    read_image,
)
from tests.test_decode_fuzz import minimal_eps, minimal_psd, png_chunk

REPO = Path(__file__).resolve().parent.parent

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


def _gray_image(mode: str, orientation: int = 1) -> bytes:
    """A 37x23 gray picture in ``mode`` with every value used (two of them in mode 1), saved as TIFF."""
    values = np.random.default_rng(3).integers(0, 256, (23, 37), dtype=np.uint8)
    img = Image.fromarray(values)
    if mode in ("I;16", "I"):
        img = Image.fromarray(values.astype(np.uint16) * 257).convert(mode)
    elif mode == "F":
        img = Image.fromarray(values.astype(np.float32) * 1.5 - 40)  # values outside 0..255 too
    elif mode != "L":
        img = img.convert(mode)
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return encode(img, "TIFF", exif=exif)


@pytest.mark.parametrize("orientation", [1, 6])
@pytest.mark.parametrize("mode", ["1", "L", "LA", "I;16", "I", "F"])
def test_gray_kept_as_one_channel_is_the_rgb_decode_bit_for_bit(mode, orientation):
    """keep_gray: the gray channel alone, equal to each RGB channel, and the same model input to the bit."""
    from imageclf.preprocess import image_to_model_input

    data = _gray_image(mode, orientation)
    rgb = decode_opened(open_image(data))
    gray = decode_opened(open_image(data), keep_gray=True)
    assert gray.shape == (*rgb.shape[:2], 1) and rgb.shape[:2] == ((37, 23) if orientation == 6 else (23, 37))
    np.testing.assert_array_equal(np.repeat(gray, 3, axis=2), rgb)
    assert len(np.unique(gray)) >= 2
    for size in ((16, 16), (160, 160)):
        np.testing.assert_array_equal(image_to_model_input(gray, size), image_to_model_input(rgb, size))


def test_colour_images_stay_rgb_with_keep_gray():
    for img in (red_image(), red_image("P"), red_image("RGBA"), red_image("CMYK")):
        assert decode_opened(open_image(encode(img, "TIFF")), keep_gray=True).shape == (30, 40, 3), img.mode


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


def test_mpo_phone_jpeg_decodes():
    # Pillow opens many phone JPEGs as MPO; Image.open has no "MPO" opener of its own to allow.
    data = encode(red_image(), "MPO", save_all=True, append_images=[red_image()])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    assert np.abs(decode_image(data).astype(int) - RED).max() <= 6
    assert "MPO" in ALLOWED_FORMATS


# --- EXIF orientation ---------------------------------------------------------------------------

ORIENTATION = 0x0112
BLOCK = 16
# Corner blocks of distinct colours: every flip and turn moves at least one of them.
CORNERS = {
    "top-left": ((slice(0, BLOCK), slice(0, BLOCK)), (230, 20, 20)),
    "top-right": ((slice(0, BLOCK), slice(-BLOCK, None)), (20, 200, 20)),
    "bottom-left": ((slice(-BLOCK, None), slice(0, BLOCK)), (20, 20, 230)),
    "bottom-right": ((slice(-BLOCK, None), slice(-BLOCK, None)), (230, 230, 20)),
}


def upright_picture() -> np.ndarray:
    """64 wide, 40 high; flat areas aligned to JPEG blocks, so JPEG noise stays small."""
    pixels = np.full((40, 64, 3), 128, np.uint8)
    for where, colour in CORNERS.values():
        pixels[where] = colour
    return pixels


# How a camera stores the upright picture under each orientation, from the EXIF definitions
# ("6: the 0th row is the visual right-hand side, the 0th column the visual top"...), written
# with numpy so the test does not lean on the transposes the decoder uses.
STORED = {
    1: lambda u: u,
    2: lambda u: u[:, ::-1],
    3: lambda u: u[::-1, ::-1],
    4: lambda u: u[::-1],
    5: lambda u: u.transpose(1, 0, 2),
    6: lambda u: np.rot90(u, 1),
    7: lambda u: np.rot90(u, 1)[:, ::-1],
    8: lambda u: np.rot90(u, -1),
}
LOSSLESS = {"PNG": {}, "WEBP": {"lossless": True}, "TIFF": {}}


def stored_image(orientation: int) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(STORED[orientation](upright_picture())))


def assert_upright(pixels: np.ndarray, exact: bool = False) -> None:
    want = upright_picture()
    assert pixels.shape == want.shape
    if exact:
        np.testing.assert_array_equal(pixels, want)
    assert np.abs(pixels.astype(int) - want).mean() < 4
    for name, (where, colour) in CORNERS.items():
        centre = pixels[where][BLOCK // 2, BLOCK // 2].astype(int)
        assert np.abs(centre - colour).max() <= 16, f"{name} is {centre.tolist()}, want {colour}"


@pytest.mark.parametrize("fmt", ["JPEG", *LOSSLESS])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_turns_the_picture_upright(orientation, fmt):
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    params = LOSSLESS.get(fmt, {"quality": 95, "subsampling": 0})
    data = encode(stored_image(orientation), fmt, exif=exif, **params)
    assert Image.open(io.BytesIO(data)).getexif().get(ORIENTATION) == orientation  # the file is what we say
    assert_upright(decode_image(data), exact=fmt in LOSSLESS)


SHORT, ASCII, LONG, RATIONAL, SSHORT, FLOAT, UNDEFINED = 3, 2, 4, 5, 8, 11, 7


def tiff_block(entries: list[tuple[int, int, int, bytes]], tail: bytes = b"") -> bytes:
    """A little-endian TIFF block with one IFD; entries are (tag, type, count, 4-byte value field).

    Pillow's writer converts values to each tag's proper type, so wrong types are written by hand.
    """
    ifd = struct.pack("<H", len(entries))
    ifd += b"".join(struct.pack("<HHL", tag, kind, count) + value for tag, kind, count, value in entries)
    return b"II*\x00" + struct.pack("<L", 8) + ifd + bytes(4) + tail


def short(value: int) -> bytes:
    return struct.pack("<HH", value, 0)


TAIL = 8 + 2 + 12 * 2 + 4  # where ``tail`` starts in a block of two entries


def rational_orientation(numerator: int, denominator: int) -> bytes:
    return tiff_block([(ORIENTATION, RATIONAL, 1, struct.pack("<L", TAIL)), (0x0131, ASCII, 4, b"sw\x00\x00")],
                      tail=struct.pack("<LL", numerator, denominator))


# name -> (APP1 payload, the orientation the decoder must apply, whether ImageOps.exif_transpose raises)
EXIF_CASES = {
    "orientation-ascii": (tiff_block([(ORIENTATION, ASCII, 2, b"6\x00\x00\x00")]), 1, False),
    "orientation-undefined": (tiff_block([(ORIENTATION, UNDEFINED, 1, b"\x06\x00\x00\x00")]), 1, False),
    "orientation-negative": (tiff_block([(ORIENTATION, SSHORT, 1, struct.pack("<hh", -6, 0))]), 1, False),
    "orientation-9": (tiff_block([(ORIENTATION, SHORT, 1, short(9))]), 1, False),
    "orientation-count-0": (tiff_block([(ORIENTATION, SHORT, 0, short(6))]), 1, False),
    "orientation-rational-6/0": (rational_orientation(6, 0), 1, False),
    # Pillow (and imageclf.exif_graph) read any number type; one that is a whole 1..8 counts.
    "orientation-rational-12/2": (rational_orientation(12, 2), 6, False),
    "orientation-long": (tiff_block([(ORIENTATION, LONG, 1, struct.pack("<L", 8))]), 8, False),
    # A good orientation beside a tag of the wrong type: exif_transpose fails rewriting the block.
    "resolution-as-text": (tiff_block([(ORIENTATION, SHORT, 1, short(6)), (0x011A, ASCII, 1, b"&\x00\x00\x00")]),
                           6, True),
    "width-as-float": (tiff_block([(ORIENTATION, SHORT, 1, short(8)), (0x0100, FLOAT, 1, b"\x00\x00\xc0\x40")]),
                       8, True),
    "make-as-rational": (tiff_block([(ORIENTATION, SHORT, 1, short(3)), (0x010F, RATIONAL, 1,
                                                                          struct.pack("<L", TAIL))],
                                    tail=struct.pack("<LL", 1, 3)), 3, True),
    "exif-pointer-negative": (tiff_block([(ORIENTATION, SHORT, 1, short(5)),
                                          (0x8769, SSHORT, 1, struct.pack("<hh", -60, 0))]), 5, True),
    "garbage": (bytes(np.random.default_rng(3).integers(0, 256, 300, dtype=np.uint8)), 1, False),
    "garbage-after-tiff-header": (b"II*\x00\x08\x00\x00\x00" + b"\xff\x7f\x80\x00" * 40, 1, False),
    "ifd-past-the-end": (b"MM\x00*\xff\xff\xff\x00", 1, False),
    "cut-in-an-entry": (tiff_block([(ORIENTATION, SHORT, 1, short(6))])[:14], 1, False),
}


def jpeg_with_app1(payload: bytes, orientation: int) -> bytes:
    jpeg = encode(stored_image(orientation), "JPEG", quality=95, subsampling=0)
    app1 = b"Exif\x00\x00" + payload
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:]


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@pytest.mark.parametrize("case", EXIF_CASES)
def test_odd_or_broken_exif_never_fails_the_decode(case):
    payload, orientation, pillow_raises = EXIF_CASES[case]
    data = jpeg_with_app1(payload, orientation)
    if pillow_raises:  # the case is one that used to crash the decoder
        with pytest.raises((TypeError, ValueError, AttributeError, struct.error)):
            ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert_upright(decode_image(data, name="photo.jpg"))


def test_png_with_a_broken_exif_text_chunk_decodes():
    # PNG writers without eXIf store EXIF as hex text; bad hex makes Pillow's getexif raise.
    png = encode(Image.fromarray(upright_picture()), "PNG", pnginfo=_text_chunk("Raw profile type exif",
                                                                              "\nexif\n      12\nnot hex at all\n"))
    with pytest.raises(ValueError):
        ImageOps.exif_transpose(Image.open(io.BytesIO(png)))
    assert_upright(decode_image(png), exact=True)


def _text_chunk(key: str, value: str) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text(key, value)
    return info


# --- formats outside the allow-list -------------------------------------------------------------


def _refused() -> dict[str, tuple[bytes, str | None]]:
    """name -> (file, the format Pillow itself reads it as, None when Pillow cannot read it)."""
    small = Image.fromarray(upright_picture()).resize((16, 16))
    return {
        "eps-written-by-pillow": (encode(small, "EPS"), "EPS"),
        "eps-minimal": (minimal_eps(), "EPS"),
        "dds": (encode(small, "DDS"), "DDS"),
        "blp": (encode(small.quantize(16), "BLP"), "BLP"),
        "spider": (encode(small.convert("F"), "SPIDER"), "SPIDER"),
        "ico": (encode(small, "ICO"), "ICO"),
        "psd": (minimal_psd(), "PSD"),
        "tga": (encode(small, "TGA"), "TGA"),
        "qoi": (encode(small, "QOI"), "QOI"),
        "pdf": (encode(small, "PDF"), None),
        "text": (b"label,file\ncircle,circle_000.jpg\n" * 10, None),
    }


REFUSED = _refused()


@pytest.mark.parametrize("name", REFUSED)
def test_formats_outside_the_allow_list_are_not_images(name, monkeypatch):
    data, pillow_format = REFUSED[name]
    if pillow_format:  # Pillow reads it: the allow-list is what refuses it
        assert Image.open(io.BytesIO(data)).format == pillow_format
    monkeypatch.setattr(ImageFile.ImageFile, "load", _no_decoding)
    with pytest.raises(NotAnImageError, match="not an image") as info:
        decode_image(data, name="upload.bin")
    assert str(info.value).startswith("upload.bin: ")


def _no_decoding(self):
    raise AssertionError("pixels were decoded")


# --- every failure inside Pillow is a BadImageError ---------------------------------------------

RGB_PNG = encode(red_image(), "PNG")


@pytest.mark.parametrize("error, message", [
    (struct.error("unpack requires a buffer of 4 bytes"), "cannot decode image (error: unpack requires"),
    (TypeError("unsupported operand"), "cannot decode image (TypeError: unsupported operand"),
    (NotImplementedError("Unknown pixel format"), "cannot decode image (NotImplementedError: Unknown pixel"),
    (AttributeError("no attribute 'stkoffset'"), "cannot decode image (AttributeError: no attribute"),
    (IndexError("list index out of range"), "cannot decode image (IndexError: list index"),
    (KeyError(42), "cannot decode image (KeyError: 42)"),
    (ZeroDivisionError("division by zero"), "cannot decode image (ZeroDivisionError: division"),
    (RecursionError("maximum recursion depth"), "cannot decode image (RecursionError: maximum"),
    (OSError("broken data stream"), "truncated or corrupt image (broken data stream)"),
    (SyntaxError("not a PNG file"), "truncated or corrupt image (not a PNG file)"),
    (ValueError("tile cannot extend outside image"), "truncated or corrupt image (tile cannot"),
    (EOFError("no more data"), "truncated or corrupt image (no more data)"),
])
def test_any_decoder_failure_is_a_bad_image_error(monkeypatch, error, message):
    def fail(self):
        raise error
    monkeypatch.setattr(ImageFile.ImageFile, "load", fail)
    with pytest.raises(BadImageError) as info:
        decode_image(RGB_PNG, name="x.png")
    assert type(info.value) is BadImageError
    assert str(info.value).startswith("x.png: " + message)


@pytest.mark.parametrize("error, message", [
    (NotImplementedError("no"), "cannot decode image (NotImplementedError: no)"),
    (ZeroDivisionError("no"), "cannot decode image (ZeroDivisionError: no)"),
    (RecursionError("no"), "cannot decode image (RecursionError: no)"),
    (ValueError("no"), "truncated or corrupt image (no)"),
    (OSError("no"), "truncated or corrupt image (no)"),
    # Pillow takes these from a format's header parser to mean "not this format".
    (KeyError("no"), "not an image"),
    (struct.error("no"), "not an image"),
])
def test_failures_while_opening_are_bad_image_errors_too(monkeypatch, error, message):
    def fail(self):
        raise error
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "_open", fail)
    with pytest.raises(BadImageError) as info:
        open_image(RGB_PNG, name="x.png")
    assert str(info.value).startswith("x.png: " + message)


@pytest.mark.parametrize("error", [MemoryError, KeyboardInterrupt])
def test_memory_errors_and_interrupts_are_not_swallowed(monkeypatch, error):
    def fail(self, *args):
        raise error()
    monkeypatch.setattr(ImageFile.ImageFile, "load", fail)
    with pytest.raises(error):
        decode_image(RGB_PNG)
    monkeypatch.undo()
    monkeypatch.setattr(Image.Image, "getexif", fail)  # the EXIF read swallows the rest, not these
    with pytest.raises(error):
        decode_image(RGB_PNG)


def test_our_own_errors_pass_through_unchanged(monkeypatch):
    ours = ImageTooLargeError("x.png: tile is over the limit")

    def fail(self):
        raise ours
    monkeypatch.setattr(ImageFile.ImageFile, "load", fail)
    with pytest.raises(ImageTooLargeError) as info:
        decode_image(RGB_PNG, name="x.png")
    assert info.value is ours


# --- read_image ---------------------------------------------------------------------------------


def _unreadable_paths(tmp_path: Path) -> dict[str, str | Path]:
    (tmp_path / "file.jpg").write_bytes(encode(red_image(), "JPEG"))
    (tmp_path / "loop.jpg").symlink_to("loop.jpg")
    paths: dict[str, str | Path] = {
        "missing": tmp_path / "missing.jpg",
        "directory": tmp_path,
        "below-a-file": tmp_path / "file.jpg" / "x.jpg",
        "name-too-long": tmp_path / ("x" * 300 + ".jpg"),
        "symlink-loop": tmp_path / "loop.jpg",
        "nul-byte": str(tmp_path / "bad\x00name.jpg"),
    }
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.jpg"
        locked.write_bytes(b"x")
        locked.chmod(0)
        paths["permission-denied"] = locked
    return paths


def test_read_image_turns_every_os_error_into_a_bad_image_error(tmp_path):
    for case, path in _unreadable_paths(tmp_path).items():
        with pytest.raises(BadImageError, match="cannot read file") as info:
            read_image(path)
        assert type(info.value) is BadImageError, case
        assert "None" not in str(info.value), case
    assert read_image(tmp_path / "file.jpg").shape == (30, 40, 3)


# --- open_image, decoded_nbytes -----------------------------------------------------------------


def png_header_only(width: int, height: int, mode_byte: int = 0) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels and holds none: a few dozen bytes."""
    header = struct.pack(">LLBBBBB", width, height, 8, mode_byte, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b""))
            + png_chunk(b"IEND", b""))


def test_open_image_refuses_a_pixel_bomb_from_the_header(monkeypatch):
    monkeypatch.setattr(ImageFile.ImageFile, "load", _no_decoding)
    with pytest.raises(ImageTooLargeError, match="bomb.png: 9000x9000 pixels is over the limit of 10,000,000"):
        open_image(png_header_only(9_000, 9_000), max_pixels=10_000_000, name="bomb.png")
    with pytest.raises(ImageTooLargeError, match="bomb.png: .*over the limit of 10,000,000"):
        open_image(png_header_only(20_000, 20_000), max_pixels=10_000_000, name="bomb.png")  # past Pillow's own
    img = open_image(png_header_only(3_000, 3_000), max_pixels=10_000_000)  # under the limit: opened, not decoded
    assert img.size == (3_000, 3_000)
    assert decoded_nbytes(img) >= 3_000 * 3_000 * 3


def tiled_tiff(width: int, height: int, tile: int) -> bytes:
    """A deflate-compressed, tiled, 8-bit grayscale TIFF whose one tile is ``tile`` x ``tile``."""
    payload = zlib.compress(bytes(64))
    entries = [(256, width), (257, height), (258, 8), (259, 8), (262, 1), (277, 1),
               (322, tile), (323, tile), (324, 8 + 2 + 12 * 10 + 4), (325, len(payload))]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHLL", tag, 4, 1, value) for tag, value in entries)
    return b"II*\x00" + struct.pack("<L", 8) + ifd + bytes(4) + payload


def test_tiff_tiles_count_against_the_pixel_limit():
    # 16x16 pixels, but libtiff would allocate one 32768x32768 tile (1 GiB) to decode it.
    with pytest.raises(ImageTooLargeError, match="TIFF tiles of 32768x32768 pixels are over the limit"):
        open_image(tiled_tiff(16, 16, 32768), max_pixels=40_000_000)
    assert open_image(tiled_tiff(16, 16, 256)).size == (16, 16)  # ordinary tiles are fine


def _nbytes_cases() -> dict[str, bytes]:
    picture = Image.fromarray(np.repeat(np.repeat(upright_picture(), 8, axis=0), 8, axis=1))  # 512x320
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    return {
        "1": encode(picture.convert("1"), "PNG"),
        "L": encode(picture.convert("L"), "PNG"),
        "P-transparency": encode(picture.quantize(16), "PNG", transparency=2),
        "RGB-jpeg-turned": encode(picture, "JPEG", exif=exif),
        "RGBA": encode(picture.convert("RGBA"), "PNG"),
        "CMYK-progressive": encode(picture.convert("CMYK"), "JPEG", progressive=True),
        "I;16": encode(Image.fromarray(np.asarray(picture.convert("L"), np.uint16) * 257), "PNG"),
        "F": encode(Image.fromarray(np.asarray(picture.convert("L"), np.float32)), "TIFF"),
        "webp": encode(picture, "WEBP"),
        "gif": encode(picture.quantize(16), "GIF"),
    }


NBYTES_CASES = _nbytes_cases()


@pytest.mark.parametrize("case", NBYTES_CASES)
def test_decoded_nbytes_bounds_what_decoding_holds(case):
    img = open_image(NBYTES_CASES[case])
    estimate = decoded_nbytes(img)
    pixels = decode_opened(img)
    # The result and the decoded source are both alive at the end; Pillow keeps RGB at 4 bytes.
    source = img.size[0] * img.size[1] * (4 if len(img.getbands()) > 1 or img.mode in ("I", "F") else 1)
    assert estimate >= pixels.nbytes + source
    assert estimate <= 40 * pixels.shape[0] * pixels.shape[1] + (64 << 20)  # an upper bound, not a refusal


PEAK_SCRIPT = """
import gc, sys
from imageclf.images import decode_opened, decoded_nbytes, open_image

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

img = open_image(sys.stdin.buffer.read())
estimate = decoded_nbytes(img)
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # restart the peak-RSS count (VmHWM) from here
before = status("VmRSS:")
pixels = decode_opened(img)
print(estimate, status("VmHWM:") - before)
"""


def _big(fmt: str, mode: str = "RGB", **params) -> bytes:
    gradient = np.linspace(0, 255, 2400, dtype=np.uint8)
    pixels = np.stack([np.broadcast_to(gradient, (1600, 2400))] * 3, axis=2).copy()
    pixels[::50] = (250, 10, 10)
    img = Image.fromarray(pixels)
    if mode == "I;16":
        img = Image.fromarray(np.asarray(img.convert("L"), np.uint16) * 257)
    elif mode != "RGB":
        img = img.convert(mode)
    return encode(img, fmt, **params)


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc to measure peak RSS")
@pytest.mark.parametrize("case", ["jpeg-turned", "jpeg-cmyk-progressive", "webp-turned", "png-16bit", "png-1bit"])
def test_decoded_nbytes_bounds_the_measured_peak_memory(case):
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    data = {
        "jpeg-turned": lambda: _big("JPEG", exif=exif),
        "jpeg-cmyk-progressive": lambda: _big("JPEG", "CMYK", progressive=True, subsampling=0),
        "webp-turned": lambda: _big("WEBP", exif=exif),
        "png-16bit": lambda: _big("PNG", "I;16", compress_level=1),
        "png-1bit": lambda: _big("PNG", "1"),
    }[case]()
    run = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], input=data, capture_output=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120, check=True)
    estimate, peak = map(int, run.stdout.split())
    assert peak > 2400 * 1600 * 3  # the measurement sees at least the result array
    assert peak <= estimate, f"decoding took {peak / 2**20:.1f} MiB, estimated {estimate / 2**20:.1f} MiB"
