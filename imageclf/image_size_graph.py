"""An encoded image's width and height, read from its header with TensorFlow ops, before decoding.

The exported graph's ``image_bytes:0`` input decodes whatever it is given, and TensorFlow's
decoders allocate the whole image the header announces: a PNG of 20000x20000 pixels of one
colour is a few tens of KB that decode to 1.2 GB (and four times that as floats for the
resize). A graph served by TensorFlow Serving has no Python in front of it to refuse such a
file, so the graph itself reads the size first (preprocess_graph.decode_to_model_input) and refuses
images over its pixel limit before a pixel is decoded.

The fields read are the ones TensorFlow's decoders allocate from: JPEG through
``extract_jpeg_shape``; PNG's IHDR; GIF's logical screen; BMP's info header (signed height,
as the decoder takes its absolute value); WebP's VP8 frame header, VP8L header or VP8X canvas.
Files of other formats (which the graph does not decode) and headers cut short give 0x0.
"""

from __future__ import annotations

import tensorflow as tf

# The byte readers of the EXIF parser: clamped, never raising, whatever the bytes.
from imageclf.exif_graph import _big_endian, _bytes, _equals, _little_endian

_OTHER, _JPEG, _PNG, _GIF, _BMP, _WEBP = range(6)
_HEADER = 32  # bytes: enough for every field read below


def encoded_image_size(encoded: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Encoded image bytes (scalar string tensor) -> (height, width) from the header, int64 scalars."""
    data = tf.convert_to_tensor(encoded, tf.string)
    size = tf.cast(tf.strings.length(data), tf.int64)
    head = _bytes(data, size, 0, _HEADER)  # zero padded past the end
    height_width = tf.switch_case(_format(head), [
        lambda: tf.zeros([2], tf.int64),
        lambda: tf.cast(tf.io.extract_jpeg_shape(data)[:2], tf.int64),
        lambda: tf.stack([_big_endian(head[20:24]), _big_endian(head[16:20])]),
        lambda: tf.stack([_little_endian(head[8:10]), _little_endian(head[6:8])]),
        lambda: tf.stack([tf.abs(_signed32(_little_endian(head[22:26]))), _signed32(_little_endian(head[18:22]))]),
        lambda: _webp_size(head),
    ])
    return height_width[0], height_width[1]


def _format(head: tf.Tensor) -> tf.Tensor:
    """Which decoder tf.io.decode_image picks, by the same magic bytes."""
    kinds = [(_JPEG, _equals(head[0:3], b"\xff\xd8\xff")),
             (_PNG, _equals(head[0:8], b"\x89PNG\r\n\x1a\n")),
             (_GIF, _equals(head[0:4], b"GIF8")),
             (_BMP, _equals(head[0:2], b"BM")),
             (_WEBP, _equals(head[0:4], b"RIFF") & _equals(head[8:12], b"WEBP"))]
    kind = tf.constant(_OTHER)
    for number, matches in reversed(kinds):  # the first match wins, as in the decoder
        kind = tf.where(matches, number, kind)
    return kind


def _webp_size(head: tf.Tensor) -> tf.Tensor:
    """[height, width] of a WebP: its canvas (VP8X), or its only image (VP8L, VP8)."""
    chunk = head[12:16]
    lossless = _little_endian(head[21:25])  # after the 0x2f signature: 14 bits width - 1, 14 bits height - 1
    vp8l = tf.stack([tf.bitwise.bitwise_and(tf.bitwise.right_shift(lossless, 14), 0x3FFF) + 1,
                     tf.bitwise.bitwise_and(lossless, 0x3FFF) + 1])
    vp8 = tf.stack([tf.bitwise.bitwise_and(_little_endian(head[28:30]), 0x3FFF),
                    tf.bitwise.bitwise_and(_little_endian(head[26:28]), 0x3FFF)])
    vp8x = tf.stack([_little_endian(head[27:30]) + 1, _little_endian(head[24:27]) + 1])
    return tf.where(_equals(chunk, b"VP8X"), vp8x,
                    tf.where(_equals(chunk, b"VP8L"), vp8l,
                             tf.where(_equals(chunk, b"VP8 "), vp8, tf.zeros([2], tf.int64))))


def _signed32(value: tf.Tensor) -> tf.Tensor:
    return tf.where(value >= 2 ** 31, value - 2 ** 32, value)
