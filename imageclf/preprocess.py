"""The one definition of how decoded pixels become model input, without TensorFlow.

label_image and the service (with either runtime) turn pixels into model input with these
steps; preprocess_graph.py has the same steps as TensorFlow ops for what runs inside a graph
(training's batched bottleneck and fine-tune steps, ``image_bytes`` in exported graphs), held
equal to these by tests. Model input is float32 RGB in [0, 1] (the
convention of TF Hub image modules), resized to the base model's size with an antialiased
bilinear (triangle) filter: when an image shrinks, the filter widens with the reduction, so
every source pixel counts (TensorFlow's ``resize(..., antialias=True)``, Pillow's BILINEAR).
Computed by Pillow in 32-bit float, which matches TensorFlow's resize to about 1e-6, so the
service need not load TensorFlow to serve a LiteRT model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

#: Part of the bottleneck cache key: vectors cached under another version are not reused.
#: Bump it whenever decoding (imageclf/images.py), resizing or scaling (here and in
#: preprocess_graph.py) changes the pixels a base model is fed, or every cache silently keeps
#: features of the old pixels.
PREPROCESS_VERSION = 2  # 2: JPEGs decoded at reduced scale in the DCT; EXIF orientation in the graph

_INV_255 = np.float32(1 / 255)


def image_to_model_input(pixels: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """One uint8 RGB image ``[h, w, 3]`` -> float32 ``[H, W, 3]`` in [0, 1].

    A gray image may come as its one channel, ``[h, w, 1]`` (images.decode_opened with
    ``keep_gray``): it is resized once and then repeated, which gives the same values as
    resizing its RGB copy (each channel is resized on its own) for a third of the work.
    """
    height, width = int(size[0]), int(size[1])
    # Pillow resizes one 32-bit float channel at a time ("F" images), in C and without the GIL.
    channels = [np.asarray(Image.fromarray(pixels[..., c]).convert("F").resize((width, height), Image.BILINEAR))
                for c in range(pixels.shape[-1])]
    out = np.stack(channels if len(channels) == 3 else channels * 3, axis=-1)
    out *= _INV_255
    return out


def pack_images(images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Images of different sizes -> (all pixels ``[sum(h*w), 3]``, sizes ``[n, 2]``) for one TF call."""
    shapes = np.array([img.shape[:2] for img in images], dtype=np.int32).reshape(-1, 2)
    flat = np.concatenate([img.reshape(-1, 3) for img in images]) if images else np.zeros((0, 3), np.uint8)
    return flat, shapes
