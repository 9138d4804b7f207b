"""Decoding image files into RGB pixels with Pillow.

Files are recognised by their content, never by their extension. Whatever the source format
(JPEG, PNG, GIF, BMP, WebP, TIFF...), colour mode (grayscale, palette, RGBA, CMYK, 16-bit) or
EXIF orientation, the result is an upright ``uint8`` array of shape ``[height, width, 3]``.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from imageclf.errors import BadImageError, ImageTooLargeError, NotAnImageError

#: Default bound on width * height; larger images are refused before their pixels are decoded.
DEFAULT_MAX_PIXELS = 40_000_000

_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image") -> np.ndarray:
    """Decode encoded image bytes into an upright RGB ``uint8`` array ``[h, w, 3]``.

    Raises BadImageError (or ImageTooLargeError) with a message that names ``name``.
    """
    if not data:
        raise BadImageError(f"{name}: empty file")
    try:
        with warnings.catch_warnings():
            # Pillow warns about large images; we apply our own, stricter bound below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise ImageTooLargeError(
                    f"{name}: {width}x{height} pixels is over the limit of {max_pixels:,} pixels"
                )
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb_array(img)
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise NotAnImageError(f"{name}: not an image (unrecognised content)") from None
    except Image.DecompressionBombError:
        # Pillow's own, looser bound tripped while opening: the same answer in our words.
        raise ImageTooLargeError(f"{name}: image is over the limit of {max_pixels:,} pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImageError(f"{name}: truncated or corrupt image ({e})") from None


def read_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read and decode one image file; see decode_image."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BadImageError(f"{path}: cannot read file ({e.strerror})") from None
    return decode_image(data, max_pixels=max_pixels, name=str(path))


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    if img.mode in _SIXTEEN_BIT_MODES:
        # Pillow's own conversion clips 16-bit values at 255; scale them down instead.
        wide = np.asarray(img, dtype=np.uint32)
        gray = (np.clip(wide, 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode == "F":
        gray = np.clip(np.asarray(img, dtype=np.float32), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode != "RGB":
        # Alpha is dropped, as TensorFlow's decoders do, so every path sees the same pixels.
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


# --- provisional (service engineer): replaced by the decoder work in progress -----------------
def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image") -> Image.Image:
    if not data:
        raise BadImageError(f"{name}: empty file")
    Image.init()
    try:
        img = Image.open(io.BytesIO(data), formats=("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF"))
    except UnidentifiedImageError:
        raise NotAnImageError(f"{name}: not an image (unrecognised content)") from None
    except Exception as e:  # noqa: BLE001
        raise BadImageError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from None
    width, height = img.size
    if width * height > max_pixels:
        raise ImageTooLargeError(f"{name}: {width}x{height} pixels is over the limit of {max_pixels:,} pixels")
    return img


def decode_opened(img: Image.Image, name: str = "image") -> np.ndarray:
    try:
        img.load()
        try:
            img = ImageOps.exif_transpose(img)
        except Exception:  # noqa: BLE001
            pass
        return _to_rgb_array(img)
    except Exception as e:  # noqa: BLE001
        raise BadImageError(f"{name}: truncated or corrupt image ({type(e).__name__}: {e})") from None


def decoded_nbytes(img: Image.Image) -> int:
    width, height = img.size
    return width * height * (4 + 3)
