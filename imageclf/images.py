"""Decoding image files into RGB pixels with Pillow.

Files are recognised by their content, never by their extension. Whatever the source format
(JPEG, PNG, GIF, BMP, WebP, TIFF), colour mode (grayscale, palette, RGBA, CMYK, 16-bit) or
EXIF orientation, the result is an upright ``uint8`` array of shape ``[height, width, 3]``.

Every failure to decode one file is a :class:`~imageclf.errors.BadImageError` (or one of its
subclasses), never another exception: uploads and training folders hold whatever people put
there, and one bad file must give a clear message, not a crash or an HTTP 500.

Decoding runs in two steps so that a caller can bound memory before any pixel is decoded:
:func:`open_image` reads the header only, :func:`decoded_nbytes` tells how much decoding will
take, :func:`decode_opened` decodes. :func:`decode_image` does both steps in a row.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from imageclf.errors import BadImageError, ImageTooLargeError, NotAnImageError

#: Default bound on width * height; larger images are refused before their pixels are decoded.
DEFAULT_MAX_PIXELS = 40_000_000

#: The only Pillow formats we decode. Pillow reads dozens more, most of them rarely used and so
#: rarely hardened against hostile files; EPS would even run Ghostscript on an upload. MPO is
#: how Pillow opens many phone JPEGs (a JPEG with extra frames appended).
ALLOWED_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "BMP", "WEBP", "TIFF", "HEIF")

try:  # HEIC/HEIF, the format of iPhone photos, through the maintained pillow-heif plugin
    import pillow_heif

    pillow_heif.register_heif_opener()
except ImportError:  # pragma: no cover - a requirement; without it HEIC files are "not an image"
    pass

# What Image.open tries. MPO has no opener of its own (Pillow's JPEG opener returns MPO files,
# and Image.open raises KeyError when asked for "MPO"), so it is left out here.
_OPENERS = tuple(f for f in ALLOWED_FORMATS if f != "MPO" and (f != "HEIF" or "pillow_heif" in globals()))

_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
# One gray channel (alpha aside): their RGB is that channel three times.
_GRAY_MODES = {"1", "L", "LA", "F", *_SIXTEEN_BIT_MODES}

# The transpose that shows a picture stored with each EXIF orientation upright (the same table as
# ImageOps.exif_transpose and imageclf.exif_graph, so every decoder turns a photo the same way).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# Pixels converted to RGB per step: whole-image conversions would hold two or three more
# full-size copies (Pillow keeps RGB at 4 bytes a pixel, and tobytes() copies once more).
_BAND_PIXELS = 1 << 18

# Bytes a pixel of each mode takes in Pillow's memory (RGB is padded to 4). Modes not listed
# count as 8, more than any of Pillow's, so an unexpected mode is never under-counted.
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
_WIDE_MODES = {"I", "F", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "LA", "La", "PA"}
_MAX_MODE_BYTES = 8

# Room for decoder state and the temporaries of one band: a fixed part, and a part per column
# (decoders keep a few scan lines, up to 16 bytes a pixel for 16-bit RGBA PNG rows).
_FIXED_OVERHEAD = 16 << 20
_BYTES_PER_COLUMN = 64

_DETAIL_CHARS = 200  # exception texts can quote file contents; keep messages short

#: JPEG decoders can scale down by these factors while decoding (libjpeg's DCT scaling).
JPEG_SCALES = (8, 4, 2, 1)


def jpeg_scale(width: int, height: int, size: Sequence[int]) -> int:
    """The largest DCT scale-down that keeps both sides at least the model input's longer side.

    Pillow's ``draft`` and TensorFlow's ``decode_jpeg(ratio=...)`` give bit-identical pixels at
    the same scale (measured for 4:4:4, 4:2:0, progressive, gray and CMYK JPEGs at every
    scale), so the Python path and the graph (preprocess_graph.decode_to_model_input, which applies
    this same rule) agree. The rule compares the shorter side with the longer target side, so
    the scale does not depend on the EXIF orientation.
    """
    need = max(int(size[0]), int(size[1]))
    for scale in JPEG_SCALES:
        if min(width, height) // scale >= need:
            return scale
    return 1


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image",
                 size: Sequence[int] | None = None) -> np.ndarray:
    """Decode encoded image bytes into an upright RGB ``uint8`` array ``[h, w, 3]``.

    With ``size`` (the model input's height and width), a JPEG is decoded at the reduced scale
    :func:`jpeg_scale` picks: a 12 MP photo for a 160x160 model comes out 504x378, never 12 MP.
    Raises BadImageError (NotAnImageError, ImageTooLargeError) with a message that names ``name``.
    """
    return decode_opened(open_image(data, max_pixels=max_pixels, name=name, size=size), name=name)


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image",
               size: Sequence[int] | None = None) -> Image.Image:
    """Identify encoded image bytes from their header, without decoding pixels.

    With ``size``, a JPEG is set to decode at reduced scale (see decode_image); ``img.size``
    is then the reduced size. ``max_pixels`` applies to the size in the file.
    Raises BadImageError for an empty file, NotAnImageError for content that is not one of
    ALLOWED_FORMATS, ImageTooLargeError when width * height is over ``max_pixels``.
    """
    if not data:
        raise BadImageError(f"{name}: empty file")
    with _decode_errors(name, max_pixels):
        with warnings.catch_warnings():
            # Pillow warns about large images; we apply our own, stricter bound below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=_OPENERS)
        width, height = img.size
    if img.format not in ALLOWED_FORMATS:  # an opener handing back another plugin's image
        raise NotAnImageError(f"{name}: not an image (unsupported format {img.format})")
    if width * height > max_pixels:
        raise ImageTooLargeError(f"{name}: {width}x{height} pixels is over the limit of {max_pixels:,} pixels")
    if width < 1 or height < 1:
        raise BadImageError(f"{name}: image has no pixels ({width}x{height})")
    if img.format == "TIFF":
        block_width, block_height = _tiff_block(img)
        if block_width * block_height > max_pixels:
            raise ImageTooLargeError(f"{name}: TIFF tiles of {block_width}x{block_height} pixels are over the "
                                     f"limit of {max_pixels:,} pixels")
    if size is not None and img.format in ("JPEG", "MPO"):
        _draft(img, jpeg_scale(width, height, size), name)
    return img


def _draft(img: Image.Image, scale: int, name: str) -> None:
    """Have libjpeg decode at 1/scale; Pillow picks its scale from a requested size."""
    img.info["imageclf_file_size"] = img.size  # the coefficient buffer stays at the file's size
    if scale > 1:
        width, height = img.size
        with _decode_errors(name):
            img.draft(img.mode, (width // scale, height // scale))


def decode_opened(img: Image.Image, name: str = "image", keep_gray: bool = False) -> np.ndarray:
    """Decode an image from :func:`open_image` into an upright RGB ``uint8`` array ``[h, w, 3]``.

    With ``keep_gray``, a gray image (modes 1, L, LA, I;16, I, F) comes back as its one channel,
    ``[h, w, 1]``: the same values as each RGB channel, at a third of the memory and of the work
    of everything after (preprocess.image_to_model_input takes both). A 39 MP bilevel TIFF of a
    few KB costs a third of the CPU time this way.
    Raises BadImageError for a file that turns out truncated or corrupt while its pixels are read.
    """
    with _decode_errors(name):
        img.load()
        method = _UPRIGHT.get(_exif_orientation(img))
        if method is not None:
            img = img.transpose(method)
        return _to_array(img, 1 if keep_gray and img.mode in _GRAY_MODES else 3)


def decoded_nbytes(img: Image.Image) -> int:
    """An upper bound of the bytes that :func:`decode_opened` allocates at its peak for ``img``.

    Counted per pixel: the decoded image in Pillow's memory, twice (a copy turned upright by the
    EXIF orientation, counted always because reading it may need the pixels), and the 3-byte RGB
    result; plus what some decoders keep besides the image: libjpeg's coefficients of a
    progressive or multi-scan JPEG (2 bytes a sample, per component), libwebp's two RGBA canvases
    and the RGBA frame it hands over, libtiff's strip or tile buffer; plus an allowance for scan
    lines (per column) and for decoder state and band temporaries (fixed).
    The caller's own reference keeps the source image alive, so nothing is counted as freed early.
    """
    width, height = img.size
    pixels = width * height
    per_pixel = 2 * _mode_bytes(img) + 3
    extra = 0
    if img.format in ("JPEG", "MPO"):
        extra = _jpeg_coefficient_bytes(img)
    elif img.format in ("WEBP", "HEIF"):
        per_pixel += 3 * 4  # libwebp's canvases; libheif's decoded planes and their RGB conversion
    elif img.format == "TIFF":
        extra = _tiff_buffer_bytes(img)
    return pixels * per_pixel + extra + width * _BYTES_PER_COLUMN + _FIXED_OVERHEAD


def _exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation (1..8) of an opened image; 1 (as stored) when there is no usable tag.

    A damaged EXIF block or an Orientation of the wrong type never fails the decode: the pixels
    are still good, so they are used as stored. As with Pillow's ``ImageOps.exif_transpose`` (and
    imageclf.exif_graph), any number type counts when it equals a whole number 1..8 (a SHORT 6,
    a RATIONAL 12/2); text, bytes, lists and other values count as 1.
    """
    try:
        value = img.getexif().get(ExifTags.Base.Orientation, 1)
        if isinstance(value, (str, bytes, bytearray, tuple, list, bool)) or value is None:
            return 1
        number = float(value)
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - whatever breaks in the EXIF block, the picture is usable
        return 1
    if number.is_integer() and 1 <= number <= 8:
        return int(number)
    return 1


#: How many leading bytes Pillow looks at to pick a format (Image.open reads this many).
HEADER_BYTES = 16


def looks_like_image(header: bytes) -> bool:
    """Whether a file starting with ``header`` (its first HEADER_BYTES) is in a format we decode.

    Pillow's own checks, the ones Image.open uses to pick a plugin among ALLOWED_FORMATS, so a
    file refused here is one open_image would refuse too, and can be refused before the rest of
    it is read.
    """
    Image.init()
    for name in _OPENERS:
        factory, accept = Image.OPEN.get(name, (None, None))
        if factory is None:
            continue
        verdict = accept(header) if accept else True
        if verdict and not isinstance(verdict, (str, bytes)):  # a str is Pillow's "no, and here is why"
            return True
    return False


def decoder_versions() -> dict[str, str | None]:
    """The versions of the libraries that turn file bytes into pixels here (Pillow and its codecs).

    A new libjpeg or Pillow can change decoded pixels by a level or two, so anything cached
    from decoded pixels (bottleneck vectors) is keyed by these.
    """
    from PIL import __version__ as pillow_version
    from PIL import features

    versions: dict[str, str | None] = {"pillow": pillow_version}
    # Not zlib: PNG is lossless whatever its version, and the version reported is that of whichever
    # copy of zlib the process loaded first (TensorFlow brings its own), so it varies by import order.
    for name in ("jpg", "libjpeg_turbo", "webp", "libtiff"):
        versions[name] = features.version(name)
    if "pillow_heif" in globals():
        versions["pillow_heif"] = pillow_heif.__version__
        versions["libheif"] = pillow_heif.libheif_version()
    return versions


def read_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS,
               size: Sequence[int] | None = None) -> np.ndarray:
    """Read and decode one image file; see decode_image."""
    return decode_image(read_file(path), max_pixels=max_pixels, name=str(path), size=size)


def read_file(path: str | os.PathLike) -> bytes:
    """The bytes of an image file; any failure to read it is a BadImageError naming the path."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise BadImageError(f"{path}: cannot read file ({reason})") from None
    except ValueError as e:  # a path with a NUL byte in it never reaches the OS
        raise BadImageError(f"{path!r}: cannot read file ({e})") from None


@contextmanager
def _decode_errors(name: str, max_pixels: int | None = None) -> Iterator[None]:
    """Turns whatever Pillow raises on one file into BadImageError naming that file.

    Plugins fail with nearly any exception type on hostile input (struct.error, IndexError,
    NotImplementedError, ZeroDivisionError...); none of them is a fault of this process.
    MemoryError is: it is left alone, as are KeyboardInterrupt and SystemExit.
    """
    try:
        yield
    except (BadImageError, MemoryError):
        raise
    except UnidentifiedImageError:
        raise NotAnImageError(f"{name}: not an image (unrecognised content)") from None
    except Image.DecompressionBombError:
        # Pillow's own, looser bound tripped while opening: the same answer in our words.
        limit = f" of {max_pixels:,} pixels" if max_pixels is not None else ""
        raise ImageTooLargeError(f"{name}: image is over the limit{limit}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImageError(f"{name}: truncated or corrupt image ({_detail(e)})") from None
    except Exception as e:  # noqa: BLE001 - see the docstring
        raise BadImageError(f"{name}: cannot decode image ({type(e).__name__}: {_detail(e)})") from None


def _detail(e: BaseException) -> str:
    text = str(e)
    return text if len(text) <= _DETAIL_CHARS else text[:_DETAIL_CHARS] + "..."


def _to_array(img: Image.Image, channels: int) -> np.ndarray:
    """``[h, w, channels]`` uint8: RGB (3), or the gray channel of a gray image (1)."""
    width, height = img.size
    out = np.empty((height, width, channels), np.uint8)
    rows = max(1, _BAND_PIXELS // max(width, 1))
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        band = img.crop((0, top, width, bottom))
        out[top:bottom] = _band_to_rgb(band) if channels == 3 else _band_to_gray(band)
    return out


def _band_to_gray(band: Image.Image) -> np.ndarray:
    """``[rows, w, 1]`` uint8 for one band of a gray image: the value each RGB channel would have."""
    if band.mode in _SIXTEEN_BIT_MODES or band.mode == "F":
        return _band_to_rgb(band)
    return np.asarray(band if band.mode == "L" else band.convert("L"), dtype=np.uint8)[:, :, None]


def _band_to_rgb(band: Image.Image) -> np.ndarray:
    """``[rows, w, 3]`` uint8 for one horizontal band of the image, or ``[rows, w, 1]`` for gray."""
    if band.mode in _SIXTEEN_BIT_MODES:
        # Pillow's own conversion clips 16-bit values at 255; scale them down instead.
        wide = np.asarray(band).astype(np.int64)
        return (np.clip(wide, 0, 65535) >> 8).astype(np.uint8)[:, :, None]
    if band.mode == "F":
        values = np.nan_to_num(np.asarray(band, dtype=np.float32), nan=0.0)
        return np.clip(values, 0, 255).astype(np.uint8)[:, :, None]
    if band.mode == "P" and "transparency" in band.info:
        band = band.convert("RGBA")
    if band.mode != "RGB":
        # Alpha is dropped, as TensorFlow's decoders do, so every path sees the same pixels.
        band = band.convert("RGB")
    return np.asarray(band, dtype=np.uint8)


def _mode_bytes(img: Image.Image) -> int:
    if img.mode in _MODE_BYTES:
        return _MODE_BYTES[img.mode]
    return 4 if img.mode in _WIDE_MODES else _MAX_MODE_BYTES


def _jpeg_coefficient_bytes(img: Image.Image) -> int:
    """libjpeg's whole-image coefficient buffer, as if every file were progressive or multi-scan.

    Whether a baseline file has several scans shows only after the header Pillow reads, so this
    is counted for every JPEG: 2 bytes per sample, each component at its own sampling, padded to
    whole blocks and MCUs.
    """
    width, height = img.info.get("imageclf_file_size", img.size)
    layers = getattr(img, "layer", None) or [("", 1, 1, 0)] * max(1, len(img.getbands()))
    try:
        h_max = max(int(h) for _, h, _, _ in layers) or 1
        v_max = max(int(v) for _, _, v, _ in layers) or 1
        total = 0
        for _, h, v, _ in layers:
            total += 2 * (width * int(h) // h_max + 8 * int(h) + 8) * (height * int(v) // v_max + 8 * int(v) + 8)
        return total
    except (TypeError, ValueError):
        return 2 * 4 * (width + 40) * (height + 40)  # 4 components at full resolution, padded


def _tiff_buffer_bytes(img: Image.Image) -> int:
    """The strip or tile buffer libtiff decodes into before Pillow copies it into the image."""
    block_width, block_height = _tiff_block(img)
    samples, bits = _tiff_tag(img, 277, 1), _tiff_tag(img, 258, 8)
    bytes_per_pixel = max(4, samples * -(-bits // 8))  # 4: the RGBA path for YCbCr and old JPEG
    return block_width * block_height * bytes_per_pixel


def _tiff_block(img: Image.Image) -> tuple[int, int]:
    """Width and height of the tiles of a tiled TIFF, or of its strips.

    Tiles may be larger than the image, and libtiff allocates a whole tile: a 16x16 image with
    32768x32768 tiles is a few hundred bytes that take 1 GiB to decode. Strips are at most the
    image (libtiff clamps RowsPerStrip to the image height).
    """
    # As stored: img.size is already turned for orientations 5 to 8.
    width, height = _tiff_tag(img, 256, img.size[0]), _tiff_tag(img, 257, img.size[1])
    tags = getattr(img, "tag_v2", None) or {}
    if 322 in tags or 323 in tags:  # TileWidth, TileLength
        return _tiff_tag(img, 322, width), _tiff_tag(img, 323, height)
    return width, min(height, _tiff_tag(img, 278, height))  # RowsPerStrip


def _tiff_tag(img: Image.Image, number: int, default: int) -> int:
    """A TIFF tag's first value as a positive int; ``default`` when missing or unreadable."""
    try:
        value = img.tag_v2.get(number, default)
        value = value[0] if isinstance(value, tuple) else value
        return max(1, int(value))
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - a damaged tag counts as absent
        return default
