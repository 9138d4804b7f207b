"""The one definition of how decoded pixels become model input.

Training, label_image, the service and the ``image_bytes`` input inside exported graphs all
call these functions, so a picture gets the same numbers wherever it is classified.
Model input is float32 RGB in [0, 1] (the convention of TF Hub image modules), resized to the
base model's size with antialiased bilinear interpolation.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

#: Part of the bottleneck cache key: vectors cached under another version are not reused.
#: Bump it whenever decoding (imageclf/images.py), resizing or scaling (here) changes the
#: pixels a base model is fed, or every cache silently keeps features of the old pixels.
PREPROCESS_VERSION = 1


def to_model_input(pixels, size: Sequence[int]) -> tf.Tensor:
    """uint8 RGB ``[h, w, 3]`` (or a batch ``[n, h, w, 3]``) -> float32 ``[..., H, W, 3]`` in [0, 1]."""
    x = tf.image.convert_image_dtype(tf.convert_to_tensor(pixels, tf.uint8), tf.float32)
    return tf.image.resize(x, list(size), method="bilinear", antialias=True)


def image_to_model_input(pixels: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """One uint8 RGB image ``[h, w, 3]`` -> float32 ``[H, W, 3]`` in [0, 1], as NumPy (to_model_input, compiled)."""
    return _compiled_to_model_input(*size)(pixels).numpy()


@functools.cache
def _compiled_to_model_input(height: int, width: int) -> tf.types.experimental.PolymorphicFunction:
    # One trace serves every input size; dispatching the same ops eagerly costs 2-3x as much per image.
    return tf.function(lambda pixels: to_model_input(pixels, (height, width)), autograph=False,
                       input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])


def decode_to_model_input(encoded: tf.Tensor, size: Sequence[int]) -> tf.Tensor:
    """Encoded bytes (scalar string tensor) -> float32 ``[H, W, 3]``, inside a TF graph.

    TensorFlow decodes JPEG, PNG, GIF (first frame), BMP and WebP here by their content. JPEG
    uses the accurate integer DCT, which gives the same pixels as Pillow (TF's default, the
    fast DCT, is off by up to 5 levels and moves scores by a few percent).
    """
    pixels = tf.cond(
        tf.io.is_jpeg(encoded),
        lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False))
    pixels.set_shape([None, None, 3])
    return to_model_input(pixels, size)


def pack_images(images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Images of different sizes -> (all pixels ``[sum(h*w), 3]``, sizes ``[n, 2]``) for one TF call."""
    shapes = np.array([img.shape[:2] for img in images], dtype=np.int32).reshape(-1, 2)
    flat = np.concatenate([img.reshape(-1, 3) for img in images]) if images else np.zeros((0, 3), np.uint8)
    return flat, shapes


def packed_to_model_input(flat: tf.Tensor, shapes: tf.Tensor, size: Sequence[int]) -> tf.Tensor:
    """The output of pack_images -> float32 ``[n, H, W, 3]``, resizing inside one graph call."""
    ends = tf.cumsum(shapes[:, 0] * shapes[:, 1])
    starts = ends - shapes[:, 0] * shapes[:, 1]

    def one(i):
        pixels = tf.reshape(flat[starts[i]:ends[i]], [shapes[i, 0], shapes[i, 1], 3])
        return to_model_input(pixels, size)
    return tf.map_fn(one, tf.range(tf.shape(shapes)[0]),
                     fn_output_signature=tf.TensorSpec([size[0], size[1], 3], tf.float32))


def distort(images: tf.Tensor, *, flip_left_right: bool, random_crop: float,
            random_scale: float, random_brightness: float,
            generator: tf.random.Generator | None = None) -> tf.Tensor:
    """Random training distortions applied to a whole batch at once.

    ``images`` is float32 ``[n, H, W, 3]`` in [0, 1]. ``random_crop`` and ``random_scale`` are
    percentages of extra margin: together they pick, per image, a box covering 1/(crop*scale)
    of each side at a random place, which is resized back to ``[H, W]``. ``random_brightness``
    multiplies each image by a factor within that percentage of 1.
    """
    shape = tf.shape(images)
    n, height, width = shape[0], shape[1], shape[2]
    rng = generator or tf.random.get_global_generator()
    crop = 1.0 + random_crop / 100.0
    scale = rng.uniform([n], 1.0, 1.0 + random_scale / 100.0)
    side = 1.0 / (crop * scale)
    top = rng.uniform([n]) * (1.0 - side)
    left = rng.uniform([n]) * (1.0 - side)
    boxes = tf.stack([top, left, top + side, left + side], axis=1)
    out = tf.image.crop_and_resize(images, boxes, tf.range(n), tf.stack([height, width]))
    if flip_left_right:
        flip = rng.uniform([n]) < 0.5
        out = tf.where(flip[:, None, None, None], tf.reverse(out, axis=[2]), out)
    if random_brightness:
        factor = rng.uniform([n], 1.0 - random_brightness / 100.0, 1.0 + random_brightness / 100.0)
        out = out * factor[:, None, None, None]
    return tf.clip_by_value(out, 0.0, 1.0)
