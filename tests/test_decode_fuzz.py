"""Mutation fuzzing of the decoder: whatever the bytes, decode_image gives RGB pixels or BadImageError.

Seed files are real images written by Pillow in every format and mode we accept, plus formats we
refuse. Each iteration mutates one of them (bit flips, interesting byte values, truncation, chunk
duplication and deletion, inflated length fields, headers spliced from another format) and decodes
the result. Each iteration draws from its own generator, seeded from (seed, iteration), so a failure
reproduces alone:

    .venv/bin/python -m tests.test_decode_fuzz --seed 20261125 --only 1234

and other seeds explore further (``--seed 7 --iterations 20000 --budget 300``). Standalone runs
print each iteration before decoding it, so a hang shows which mutant it was.
"""

from __future__ import annotations

import argparse
import faulthandler
import io
import random
import struct
import sys
import time
import warnings
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
from PIL import Image

from imageclf.errors import BadImageError, NotAnImageError
from imageclf.images import ALLOWED_FORMATS, decode_image

SEED = 20261125
ITERATIONS = 40_000
TIME_BUDGET_S = 20.0
MAX_PIXELS = 4_000_000
SLOW_DECODE_S = 5.0  # one small mutant taking this long is a bug in itself (a near-hang)
HANG_GUARD_S = 300.0  # see test_every_mutant_decodes_or_raises_bad_image_error
REFUSED_SHARE = 0.15  # of the mutants; most of theirs stop at the first bytes, so fewer are needed


# --- seed files ---------------------------------------------------------------------------------


def picture(width: int = 48, height: int = 32) -> np.ndarray:
    """Flat coloured blocks on a gradient: structure for every decoder, small so decoding is fast."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    pixels[..., 1] = np.linspace(0, 255, height, dtype=np.uint8)[:, None]
    pixels[..., 2] = 90
    pixels[:8, :8] = (255, 0, 0)
    pixels[-8:, -12:] = (0, 0, 255)
    pixels[10:20, 18:30] = (255, 255, 255)
    return pixels


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    # A copy: Pillow's JPEG writer leaves its settings on the image, which breaks a later TIFF save.
    img.copy().save(buf, fmt, **params)
    return buf.getvalue()


def rich_exif() -> Image.Exif:
    """IFD0 with the orientation and a few other tags, an Exif sub-IFD and a GPS sub-IFD."""
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "Fuzz Camera"
    exif[0x0131] = "imageclf"
    exif[0x011A] = 72.0
    exif.get_ifd(0x8769)[0x9003] = "2024:06:11 12:00:00"
    exif.get_ifd(0x8825)[0x0002] = (48.0, 51.0, 30.0)
    return exif


def minimal_eps() -> bytes:
    return (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
            b"newpath 0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n")


def minimal_psd(width: int = 8, height: int = 6) -> bytes:
    """An uncompressed 3-channel, 8-bit RGB Photoshop file with no layers or resources."""
    header = b"8BPS" + struct.pack(">H6xHLLHH", 1, 3, height, width, 8, 3)
    sections = struct.pack(">LLL", 0, 0, 0)  # colour mode data, image resources, layers
    return header + sections + struct.pack(">H", 0) + bytes(range(256)) * (3 * width * height // 256 + 1)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">L", len(payload)) + kind + payload + struct.pack(">L", zlib.crc32(kind + payload))


def png_rgb16(pixels: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (Pillow reads these but does not write them)."""
    height, width, _ = pixels.shape
    wide = pixels.astype(">u2") * 257
    rows = b"".join(b"\x00" + wide[y].tobytes() for y in range(height))
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">LLBBBBB", width, height, 16, 2, 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(rows)) + png_chunk(b"IEND", b""))


def allowed_seeds() -> dict[str, bytes]:
    rgb = Image.fromarray(picture())

    def frames() -> list[Image.Image]:  # fresh ones each time, for the same reason as in encode
        return [rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT), rgb.transpose(Image.Transpose.ROTATE_180)]

    palette = rgb.quantize(32)
    sixteen = Image.fromarray(picture()[..., 0].astype(np.uint16) * 257)
    exif = rich_exif()
    return {
        "jpeg-baseline": encode(rgb, "JPEG", quality=90),
        "jpeg-progressive": encode(rgb, "JPEG", quality=90, progressive=True),
        "jpeg-444-optimized": encode(rgb, "JPEG", quality=95, subsampling=0, optimize=True),
        "jpeg-exif": encode(rgb, "JPEG", exif=exif),
        "jpeg-cmyk": encode(rgb.convert("CMYK"), "JPEG"),
        "jpeg-gray": encode(rgb.convert("L"), "JPEG"),
        "mpo": encode(rgb, "MPO", save_all=True, append_images=frames()[:1]),
        "png-rgb": encode(rgb, "PNG"),
        "png-rgba": encode(rgb.convert("RGBA"), "PNG"),
        "png-palette-transparency": encode(palette, "PNG", transparency=3),
        "png-16bit": encode(sixteen, "PNG"),
        "png-rgb-16bit": png_rgb16(picture()),
        "png-gray": encode(rgb.convert("L"), "PNG"),
        "png-1bit": encode(rgb.convert("1"), "PNG"),
        "png-exif": encode(rgb, "PNG", exif=exif),
        "apng": encode(rgb, "PNG", save_all=True, append_images=frames()),
        "gif-animated": encode(palette, "GIF", save_all=True, append_images=[f.quantize(32) for f in frames()],
                               duration=50, loop=0),
        "bmp-rgb": encode(rgb, "BMP"),
        "bmp-palette": encode(palette, "BMP"),
        "bmp-1bit": encode(rgb.convert("1"), "BMP"),
        "webp-lossy": encode(rgb, "WEBP", quality=80),
        "webp-lossless-alpha": encode(rgb.convert("RGBA"), "WEBP", lossless=True),
        "webp-animated": encode(rgb, "WEBP", save_all=True, append_images=frames(), duration=50),
        "webp-exif": encode(rgb, "WEBP", exif=exif),
        "tiff-deflate": encode(rgb, "TIFF", compression="tiff_adobe_deflate"),
        "tiff-lzw": encode(rgb, "TIFF", compression="tiff_lzw"),
        "tiff-jpeg": encode(rgb, "TIFF", compression="jpeg"),
        "tiff-packbits-exif": encode(rgb, "TIFF", compression="packbits", exif=exif),
        "tiff-raw-16bit": encode(sixteen, "TIFF"),
        "tiff-float": encode(Image.fromarray(picture()[..., 0].astype(np.float32)), "TIFF"),
        "tiff-cmyk": encode(rgb.convert("CMYK"), "TIFF", compression="tiff_lzw"),
        "tiff-group4": encode(rgb.convert("1"), "TIFF", compression="group4"),
        "tiff-multipage": encode(rgb, "TIFF", save_all=True, append_images=frames()),
    }


def refused_seeds() -> dict[str, bytes]:
    rgb = Image.fromarray(picture(16, 16))
    return {
        "eps-written": encode(rgb, "EPS"),
        "eps-minimal": minimal_eps(),
        "dds": encode(rgb, "DDS"),
        "blp": encode(rgb.quantize(16), "BLP"),
        "spider": encode(rgb.convert("F"), "SPIDER"),
        "ico": encode(rgb, "ICO"),
        "psd": minimal_psd(),
        "tga": encode(rgb, "TGA"),
        "pcx": encode(rgb, "PCX"),
        "ppm": encode(rgb, "PPM"),
        "sgi": encode(rgb, "SGI"),
        "qoi": encode(rgb, "QOI"),
        "pdf": encode(rgb, "PDF"),
        "text": b"name,label\ncat.jpg,cat\n" * 8,
    }


# --- structure: chunks and length fields of the common containers -------------------------------


def _u(data: bytes, pos: int, size: int, order: str) -> int | None:
    if pos < 0 or pos + size > len(data):
        return None
    return int.from_bytes(data[pos:pos + size], "little" if order == "<" else "big")


def chunk_spans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each PNG chunk, JPEG segment before the scan, or RIFF (WebP) chunk."""
    spans: list[tuple[int, int]] = []
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        pos = 8
        while (length := _u(data, pos, 4, ">")) is not None and pos + 12 + length <= len(data):
            spans.append((pos, pos + 12 + length))
            pos += 12 + length
    elif data.startswith(b"\xff\xd8"):
        pos = 2
        while pos + 4 <= len(data) and data[pos] == 0xFF and data[pos + 1] not in (0xD9, 0xDA):
            end = pos + 2 + (_u(data, pos + 2, 2, ">") or 0)
            spans.append((pos, end))
            pos = end
    elif data.startswith(b"RIFF"):
        pos = 12
        while (length := _u(data, pos + 4, 4, "<")) is not None and pos + 8 + length <= len(data):
            spans.append((pos, pos + 8 + length + length % 2))
            pos += 8 + length + length % 2
    return spans


def length_fields(data: bytes) -> list[tuple[int, int, str]]:
    """(offset, size, byte order) of fields that give lengths, counts, offsets or dimensions."""
    fields: list[tuple[int, int, str]] = []
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        fields += [(start, 4, ">") for start, _ in chunk_spans(data)]
        fields += [(16, 4, ">"), (20, 4, ">")]  # IHDR width, height
    elif data.startswith(b"\xff\xd8"):
        for start, _ in chunk_spans(data):
            fields.append((start + 2, 2, ">"))
            if data[start + 1] in (0xC0, 0xC1, 0xC2):
                fields += [(start + 5, 2, ">"), (start + 7, 2, ">")]  # SOF height, width
    elif data.startswith(b"RIFF"):
        fields += [(4, 4, "<")] + [(start + 4, 4, "<") for start, _ in chunk_spans(data)]
        fields += [(24, 3, "<"), (27, 3, "<")]  # VP8X canvas size
    elif data[:4] in (b"II*\x00", b"MM\x00*"):
        order = "<" if data[:2] == b"II" else ">"
        ifd = _u(data, 4, 4, order) or 0
        fields += [(4, 4, order), (ifd, 2, order)]
        for i in range(min(_u(data, ifd, 2, order) or 0, 64)):
            entry = ifd + 2 + 12 * i
            fields += [(entry + 4, 4, order), (entry + 8, 4, order)]  # count, value or offset
    elif data.startswith(b"GIF8"):
        fields += [(6, 2, "<"), (8, 2, "<")]
    elif data.startswith(b"BM"):
        fields += [(2, 4, "<"), (10, 4, "<"), (14, 4, "<"), (18, 4, "<"), (22, 4, "<"), (34, 4, "<")]
    return [f for f in fields if f[0] + f[1] <= len(data)]


# --- mutations ----------------------------------------------------------------------------------

INTERESTING_BYTES = (0x00, 0xFF, 0x7F, 0x80)
INTERESTING_WIDE = (0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)


def flip_bits(rng: random.Random, data: bytearray, seeds: list[bytes]) -> str:
    positions = [rng.randrange(len(data) * 8) for _ in range(rng.randint(1, 8))]
    for bit in positions:
        data[bit // 8] ^= 1 << (bit % 8)
    return f"flip bits {positions}"


def overwrite_bytes(rng: random.Random, data: bytearray, seeds: list[bytes]) -> str:
    changes = []
    for _ in range(rng.randint(1, 8)):
        pos = rng.randrange(len(data))
        data[pos] = rng.choice(INTERESTING_BYTES)
        changes.append((pos, data[pos]))
    return f"overwrite bytes {changes}"


def overwrite_wide(rng: random.Random, data: bytearray, seeds: list[bytes]) -> str:
    size, order = rng.choice((2, 4)), rng.choice("<>")
    pos = rng.randrange(max(1, len(data) - size))
    value = rng.choice(INTERESTING_WIDE) & ((1 << (8 * size)) - 1)
    data[pos:pos + size] = value.to_bytes(size, "little" if order == "<" else "big")
    return f"overwrite {size} bytes at {pos} with {value:#x}"


def inflate_length(rng: random.Random, data: bytearray, seeds: list[bytes]) -> str:
    fields = length_fields(bytes(data))
    if not fields:
        return overwrite_wide(rng, data, seeds)
    pos, size, order = rng.choice(fields)
    value = int.from_bytes(data[pos:pos + size], "little" if order == "<" else "big")
    top = (1 << (8 * size)) - 1
    new = rng.choice([value + 1, value * 2, value * 16 + 7, value - 1, 0, top, rng.getrandbits(8 * size)]) & top
    data[pos:pos + size] = new.to_bytes(size, "little" if order == "<" else "big")
    return f"length field at {pos} ({size} bytes) {value:#x} -> {new:#x}"


def _span(rng: random.Random, data: bytearray) -> tuple[int, int]:
    spans = chunk_spans(bytes(data))
    if spans and rng.random() < 0.8:
        return rng.choice(spans)
    start = rng.randrange(len(data))
    return start, min(len(data), start + rng.randint(1, 256))


def duplicate_chunk(rng: random.Random, data: bytearray, seeds: list[bytes]) -> str:
    start, end = _span(rng, data)
    at = rng.choice([end, start, rng.randrange(len(data) + 1)])
    data[at:at] = data[start:end] * rng.choice((1, 1, 2, 50))
    return f"duplicate [{start}:{end}] at {at}"


def delete_chunk(rng: random.Random, data: bytearray, seeds: list[bytes]) -> str:
    start, end = _span(rng, data)
    del data[start:end]
    return f"delete [{start}:{end}]"


def truncate(rng: random.Random, data: bytearray, seeds: list[bytes]) -> str:
    cut = rng.randrange(len(data))
    del data[cut:]
    return f"truncate at {cut}"


def splice_header(rng: random.Random, data: bytearray, seeds: list[bytes]) -> str:
    other = rng.choice(seeds)
    cut = rng.randint(2, min(len(other), 512))
    data[:cut] = other[:cut]
    return f"header of {cut} bytes from another seed"


MUTATIONS: list[Callable[[random.Random, bytearray, list[bytes]], str]] = [
    flip_bits, overwrite_bytes, overwrite_wide, inflate_length, inflate_length,
    duplicate_chunk, delete_chunk, truncate, splice_header,
]


def mutant(seed: int, iteration: int, names: list[str], seeds: list[bytes],
           refused: int = 0) -> tuple[str, bytes, list[str]]:
    """The mutant of this iteration: (seed file name, bytes, what was done to it).

    The last ``refused`` seeds are of refused formats; they get REFUSED_SHARE of the iterations.
    """
    rng = random.Random(seed * 1_000_003 + iteration)
    allowed = len(seeds) - refused
    if refused and rng.random() < REFUSED_SHARE:
        index = allowed + rng.randrange(refused)
    else:
        index = rng.randrange(allowed)
    data, steps = bytearray(seeds[index]), []
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
        if not data:
            break
        steps.append(rng.choice(MUTATIONS)(rng, data, seeds))
    return names[index], bytes(data), steps


# --- the loop -----------------------------------------------------------------------------------


@dataclass
class FuzzReport:
    iterations: int = 0
    decoded: int = 0
    refused: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    slowest: tuple[float, str] = (0.0, "")


def fuzz(seed: int, iterations: int, budget_s: float, only: int | None = None, verbose: bool = False) -> FuzzReport:
    refused = refused_seeds()
    seeds = allowed_seeds() | refused
    names, files = list(seeds), list(seeds.values())
    report = FuzzReport()
    start = time.monotonic()
    for i in [only] if only is not None else range(iterations):
        if time.monotonic() - start > budget_s:
            break
        name, data, steps = mutant(seed, i, names, files, len(refused))
        where = f"seed {seed} iteration {i}: {name}, {len(data)} bytes, {'; '.join(steps)}"
        if verbose:
            print(where, flush=True)
        began = time.monotonic()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Pillow warns about corrupt EXIF, malformed MPO...
                pixels = decode_image(data, max_pixels=MAX_PIXELS, name="mutant")
        except BadImageError as e:
            report.refused[type(e).__name__] += 1
            problem = None if str(e).startswith("mutant: ") else f"message does not name the file: {e}"
        except BaseException as e:  # noqa: BLE001 - anything else is the bug this test looks for
            if isinstance(e, KeyboardInterrupt):
                raise
            problem = f"raised {type(e).__name__}: {e}"
        else:
            report.decoded += 1
            problem = _check_pixels(pixels)
        took = time.monotonic() - began
        report.slowest = max(report.slowest, (took, where))
        if took > SLOW_DECODE_S:
            problem = problem or f"took {took:.1f} s"
        if problem:
            report.failures.append(f"{where}\n    -> {problem}")
        report.iterations += 1
    return report


def _check_pixels(pixels: object) -> str | None:
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        return f"returned {type(pixels).__name__} {getattr(pixels, 'dtype', '')} {getattr(pixels, 'shape', '')}"
    height, width, _ = pixels.shape
    if not (height >= 1 and width >= 1 and height * width <= MAX_PIXELS):
        return f"returned {width}x{height} pixels"
    return None


# --- tests --------------------------------------------------------------------------------------


def test_seed_files_are_what_they_claim():
    # The loop only proves something if the seeds decode (or are refused) before mutation.
    for name, data in allowed_seeds().items():
        with Image.open(io.BytesIO(data)) as img:
            assert img.format in ALLOWED_FORMATS, name
        pixels = decode_image(data)
        assert pixels.shape[2] == 3 and pixels.shape[0] * pixels.shape[1] >= 16 * 16, name
    for name, data in refused_seeds().items():
        with pytest.raises(NotAnImageError, match="not an image"):
            decode_image(data, name=name)


def test_every_mutant_decodes_or_raises_bad_image_error():
    # The time budget is checked between mutants; a decode stuck inside C code never returns to
    # the check, so a watchdog ends the process instead (run pytest with -s to see its tracebacks).
    try:
        faulthandler.dump_traceback_later(HANG_GUARD_S, exit=True)
    except (ValueError, io.UnsupportedOperation, AttributeError):
        pass  # a stderr without a file descriptor: the budget alone bounds the loop
    try:
        report = fuzz(SEED, ITERATIONS, TIME_BUDGET_S)
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert not report.failures, (f"{len(report.failures)} of {report.iterations} mutants failed; reproduce one with "
                                 f"`python -m tests.test_decode_fuzz --seed {SEED} --only N`:\n"
                                 + "\n".join(report.failures[:10]))
    # A loop that decodes nothing (or refuses nothing) would pass without testing anything.
    assert report.iterations >= 500, report
    assert report.decoded >= report.iterations // 10, report
    assert sum(report.refused.values()) >= report.iterations // 10, report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--iterations", type=int, default=ITERATIONS)
    parser.add_argument("--budget", type=float, default=TIME_BUDGET_S, help="seconds")
    parser.add_argument("--only", type=int, help="run this one iteration")
    parser.add_argument("--verbose", action="store_true", help="print each mutant before decoding it")
    args = parser.parse_args()
    verbose = args.verbose or args.only is not None
    report = fuzz(args.seed, args.iterations, args.budget, only=args.only, verbose=verbose)
    print(f"{report.iterations} mutants: {report.decoded} decoded, refused {dict(report.refused)}; "
          f"slowest {report.slowest[0] * 1000:.0f} ms ({report.slowest[1]})")
    for failure in report.failures:
        print("FAIL", failure)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
