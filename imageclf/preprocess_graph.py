"""The preprocessing of preprocess.py as TensorFlow ops, for what runs inside a graph.

Training computes bottlenecks and fine-tunes in one graph call per batch, and exported graphs
decode ``image_bytes`` themselves: both need the steps of preprocess.image_to_model_input as
ops. The two definitions are held equal by tests/test_preprocess_parity.py (3e-5 per value on
noise, 1e-5 on smooth pictures); a change to one is a change to both, and to PREPROCESS_VERSION.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from imageclf.images import DEFAULT_MAX_PIXELS, JPEG_SCALES


def to_model_input(pixels, size: Sequence[int]) -> tf.Tensor:
    """uint8 RGB ``[h, w, 3]`` (or a batch ``[n, h, w, 3]``) -> float32 ``[..., H, W, 3]`` in [0, 1]."""
    x = tf.image.convert_image_dtype(tf.convert_to_tensor(pixels, tf.uint8), tf.float32)
    return tf.image.resize(x, list(size), method="bilinear", antialias=True)


def decode_to_model_input(encoded: tf.Tensor, size: Sequence[int], max_pixels: int = DEFAULT_MAX_PIXELS
                          ) -> tf.Tensor:
    """Encoded bytes (scalar string tensor) -> float32 ``[H, W, 3]``, inside a TF graph.

    The same steps as the Python path (images.decode_image with ``size``, then
    image_to_model_input): a JPEG is decoded at the scale images.jpeg_scale picks, with the accurate
    integer DCT (TF's default fast DCT is off by up to 5 levels from Pillow); EXIF orientation
    is applied (exif_graph, for JPEG, PNG and WebP), then the antialiased resize. TensorFlow
    decodes JPEG, PNG, GIF (first frame), BMP and WebP here; HEIC/HEIF is refused with a
    message saying to decode it outside the graph and feed ``Placeholder:0``. An image whose
    header announces more than ``max_pixels`` is refused (InvalidArgumentError) before it is
    decoded: TensorFlow's decoders allocate whatever the header says (image_size_graph).
    """
    from imageclf.exif_graph import apply_orientation, exif_orientation
    from imageclf.image_size_graph import encoded_image_size

    refuse_heif = tf.debugging.Assert(tf.logical_not(_is_heif(encoded)), [
        "HEIC/HEIF images cannot be decoded inside this graph: decode them with Pillow (pillow-heif), "
        "or use label_image.py or the imageclf service, and feed the pixels to Placeholder:0"])
    height, width = encoded_image_size(encoded)
    # Each side first: a product of two huge 32-bit sides could overflow int64.
    small_enough = (height <= max_pixels) & (width <= max_pixels) & (height * width <= max_pixels)
    refuse_too_large = tf.debugging.Assert(small_enough, [
        f"image_bytes: image over the limit of {max_pixels:,} pixels, refused before decoding; "
        "height and width from its header:", height, width], summarize=2)
    with tf.control_dependencies([refuse_heif, refuse_too_large]):
        encoded = tf.identity(encoded)  # a plain GraphDef runs an Assert only if something needs it
    pixels = tf.cond(tf.io.is_jpeg(encoded), lambda: _decode_jpeg_at_scale(encoded, size),
                     lambda: tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False))
    pixels.set_shape([None, None, 3])
    return to_model_input(apply_orientation(pixels, exif_orientation(encoded)), size)


def _decode_jpeg_at_scale(encoded: tf.Tensor, size: Sequence[int]) -> tf.Tensor:
    """decode_jpeg's ratio is an attribute, fixed when the graph is built: one branch per scale."""
    shape = tf.io.extract_jpeg_shape(encoded)
    shorter, need = tf.minimum(shape[0], shape[1]), max(int(size[0]), int(size[1]))
    # images.jpeg_scale in graph ops: the first (largest) scale that keeps the shorter side >= need.
    fits = tf.stack([shorter // scale >= need for scale in JPEG_SCALES])
    index = tf.reduce_min(tf.where(fits, tf.range(len(JPEG_SCALES)), len(JPEG_SCALES) - 1))
    branches = [lambda scale=scale: tf.io.decode_jpeg(encoded, channels=3, ratio=scale, dct_method="INTEGER_ACCURATE")
                for scale in JPEG_SCALES]
    return tf.switch_case(index, branches)


def _is_heif(encoded: tf.Tensor) -> tf.Tensor:
    """An ISO media file whose brand is one of HEIF's (iPhone photos: ``ftypheic``)."""
    brand = tf.strings.substr(tf.strings.join([encoded, "\0" * 12]), 4, 8)  # substr fails past the end
    return tf.reduce_any(tf.equal(brand, ["ftypheic", "ftypheix", "ftypmif1", "ftypmsf1", "ftypheim",
                                          "ftypheis", "ftyphevc", "ftyphevx"]))


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
