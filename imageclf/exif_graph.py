"""EXIF orientation, read and applied with TensorFlow ops inside the exported graph.

Phone cameras store most photos sideways and record how to show them in the EXIF Orientation
tag (0x0112). Our Pillow decoder turns them upright (``ImageOps.exif_transpose``), but
``tf.io.decode_jpeg`` / ``decode_image`` ignore the tag, so the graph's ``image_bytes`` input,
and with it the SavedModel that TensorFlow Serving runs, classified the same photo lying on its
side and could give another answer. :func:`exif_orientation` finds the tag in the encoded bytes
and :func:`apply_orientation` turns the decoded pixels upright, both with plain TensorFlow ops
(string, arithmetic and control-flow ops, no ``py_function``, no custom ops), so the graph still
loads in TF Serving and through ``tf.compat.v1.import_graph_def``.

Containers read: JPEG (APP1 ``Exif`` segment), PNG (``eXIf`` chunk) and WebP (``EXIF`` chunk of
an extended, VP8X file), the ones Pillow takes the tag from for the formats TensorFlow decodes.
Which IFD0 entry counts and which field types give a number follow Pillow, so both decoders turn
a picture the same way. Anything missing, malformed or out of range gives 1 (leave as is): these
functions never raise, whatever the bytes, and every walk over the file has a fixed bound.

Not read, where Pillow differs: an XMP ``tiff:Orientation``, which Pillow falls back to when the
EXIF block has no Orientation entry; IFD0 data that only a second JPEG Exif segment holds (Pillow
appends such segments to the first); tags beyond the bounds below.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

ORIENTATION_TAG = 0x0112
MAX_SEGMENTS = 256  # JPEG markers (and junk bytes) or PNG/WebP chunks looked at before giving up
MAX_ENTRIES = 512  # IFD0 entries scanned; real files have a few dozen

_FORMAT_OTHER, _FORMAT_JPEG, _FORMAT_PNG, _FORMAT_WEBP = 0, 1, 2, 3

_EXIF_PREFIX = b"Exif\x00\x00"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II\x00*", b"MM*\x00")  # Pillow also takes the swapped ones

# How the JPEG walk moves past each marker byte that follows 0xFF (Pillow's marker table).
_STOP, _SKIP_ONE, _SKIP_TWO, _SEGMENT = 0, 1, 2, 3


def _jpeg_marker_kinds() -> list[int]:
    kinds = [_STOP] * 256  # SOS ends the header; markers Pillow does not know make it give up
    for marker in (0x00, 0xC8, *range(0xD0, 0xDA), *range(0xF0, 0xFE)):
        kinds[marker] = _SKIP_TWO  # stuffed 0xFF00 and the markers without a length field
    kinds[0xFF] = _SKIP_ONE  # fill byte: the next 0xFF starts the marker
    for marker in (*range(0xC0, 0xC8), *range(0xC9, 0xD0), *range(0xDB, 0xF0), 0xFE):
        kinds[marker] = _SEGMENT
    return kinds


# Bytes per value of each TIFF field type Pillow reads, by type number; 0 for the types it skips.
_TYPE_SIZES = (0, 1, 1, 2, 4, 8, 1, 1, 2, 4, 8, 4, 8, 4, 0, 0, 8, 0)
_SHORT, _LONG, _RATIONAL, _SBYTE, _SSHORT, _SLONG, _SRATIONAL, _FLOAT, _DOUBLE, _IFD, _LONG8 = (
    3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 16)


def exif_orientation(encoded: tf.Tensor) -> tf.Tensor:
    """Encoded image bytes (scalar string tensor) -> its EXIF Orientation, scalar int32 in 1..8.

    1 when the file has no usable tag, including files that are not JPEG, PNG or WebP.
    """
    data = tf.convert_to_tensor(encoded, tf.string)
    size = tf.cast(tf.strings.length(data), tf.int64)
    start, length, prefixes = tf.switch_case(_container(data, size), [
        _no_exif,
        lambda: _jpeg_exif(data, size),
        lambda: _png_exif(data, size),
        lambda: _webp_exif(data, size),
    ])
    start, length = _strip_exif_prefixes(data, size, start, length, prefixes)
    # Most files without EXIF skip the TIFF parsing altogether.
    return tf.cond(length > 0, lambda: _tiff_orientation(data, size, start, length),
                   lambda: tf.constant(1, tf.int32))


def apply_orientation(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """``[h, w, c]`` pixels stored with EXIF ``orientation`` -> the upright picture, as Pillow shows it.

    Each value maps to the ``Image.transpose`` that ``ImageOps.exif_transpose`` applies; values
    outside 1..8 leave the pixels as they are.
    """
    image = tf.convert_to_tensor(image)
    orientation = tf.cast(orientation, tf.int32)
    index = tf.where((orientation >= 1) & (orientation <= 8), orientation - 1, 0)
    # Plain reverse/transpose rather than tf.image.flip_*/rot90: those add rank Asserts to the graph.
    out = tf.switch_case(index, [
        lambda: tf.identity(image),                         # 1
        lambda: tf.reverse(image, [1]),                     # 2 FLIP_LEFT_RIGHT
        lambda: tf.reverse(image, [0, 1]),                  # 3 ROTATE_180
        lambda: tf.reverse(image, [0]),                     # 4 FLIP_TOP_BOTTOM
        lambda: _swap_axes(image),                          # 5 TRANSPOSE
        lambda: tf.reverse(_swap_axes(image), [1]),         # 6 ROTATE_270: a quarter turn clockwise
        lambda: tf.reverse(_swap_axes(image), [0, 1]),      # 7 TRANSVERSE
        lambda: _swap_axes(tf.reverse(image, [1])),         # 8 ROTATE_90: a quarter turn counter-clockwise
    ])
    out.set_shape([None, None, image.shape[-1]])
    return out


def _swap_axes(pixels: tf.Tensor) -> tf.Tensor:
    return tf.transpose(pixels, [1, 0, 2])


# --- reading bytes without ever raising -------------------------------------------------------


def _read(data: tf.Tensor, size: tf.Tensor, pos: tf.Tensor | int, count: tf.Tensor | int) -> tf.Tensor:
    """``count`` bytes from ``pos`` as int64, zeros past the end.

    Clamped because ``tf.strings.substr`` raises on a start past the end of the string.
    """
    count = tf.cast(count, tf.int64)
    start = tf.clip_by_value(tf.cast(pos, tf.int64), 0, size)
    raw = tf.io.decode_raw(tf.strings.substr(data, start, tf.maximum(count, 0)), tf.uint8)
    values = tf.cast(raw, tf.int64)
    return tf.pad(values, [[0, tf.maximum(count, 0) - tf.size(values, out_type=tf.int64)]])


def _bytes(data: tf.Tensor, size: tf.Tensor, pos: tf.Tensor | int, count: int) -> tf.Tensor:
    """A fixed number of bytes (``count`` a Python int), zeros past the end; fewer ops than _read."""
    start = tf.clip_by_value(tf.cast(pos, tf.int64), 0, size)
    raw = tf.io.decode_raw(tf.strings.substr(data, start, tf.constant(count, tf.int64)), tf.uint8, fixed_length=count)
    return tf.cast(raw, tf.int64)


def _equals(values: tf.Tensor, literal: bytes) -> tf.Tensor:
    return tf.reduce_all(tf.equal(values, tf.constant(list(literal), tf.int64)))


def _big_endian(values: tf.Tensor) -> tf.Tensor:
    weights = tf.constant([256 ** i for i in reversed(range(values.shape[-1]))], tf.int64)
    return tf.reduce_sum(values * weights, axis=-1)


def _little_endian(values: tf.Tensor) -> tf.Tensor:
    weights = tf.constant([256 ** i for i in range(values.shape[-1])], tf.int64)
    return tf.reduce_sum(values * weights, axis=-1)


def _unsigned(values: tf.Tensor, little: tf.Tensor) -> tf.Tensor:
    """Up to 4 bytes (last axis) as an unsigned number in the TIFF block's byte order."""
    return tf.where(little, _little_endian(values), _big_endian(values))


# --- finding the EXIF block in each container -------------------------------------------------


def _container(data: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
    head = _bytes(data, size, 0, 12)  # the zero padding matches none of the magics
    webp = _equals(head[0:4], b"RIFF") & _equals(head[8:12], b"WEBP")
    return tf.where(_equals(head[0:3], b"\xff\xd8\xff"), _FORMAT_JPEG,
                    tf.where(_equals(head[0:8], _PNG_SIGNATURE), _FORMAT_PNG,
                             tf.where(webp, _FORMAT_WEBP, _FORMAT_OTHER)))


def _no_exif() -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    zero = tf.constant(0, tf.int64)
    return zero, zero, zero


_Step = Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor, tf.Tensor]]


def _walk(step: _Step, start_pos: int, maximum_iterations: int = MAX_SEGMENTS) -> tuple[tf.Tensor, tf.Tensor]:
    """Runs ``step(pos) -> (next_pos, found, stop)`` from ``start_pos``; (pos, found) where it stopped.

    The bound keeps the cost per image fixed whatever the file holds (thousands of tiny segments,
    junk bytes, bogus lengths).
    """
    def body(pos, found, done):
        next_pos, hit, stop = step(pos)
        return tf.where(hit | stop, pos, next_pos), hit, hit | stop

    pos, found, _ = tf.while_loop(lambda pos, found, done: tf.logical_not(done), body,
                                  (tf.cast(start_pos, tf.int64), tf.constant(False), tf.constant(False)),
                                  maximum_iterations=maximum_iterations)
    return pos, found


def _jpeg_exif(data: tf.Tensor, size: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """The first APP1 ``Exif`` segment's payload before the image data, as Pillow reads the header.

    Pillow steps over junk and fill bytes between segments and stops at SOS, so the walk does too.
    """
    kinds = tf.constant(_jpeg_marker_kinds(), tf.int64)

    def step(pos):
        head = _bytes(data, size, pos, 10)  # 0xFF, marker, length (big-endian), 6 bytes of payload
        marker, length = head[1], _big_endian(head[2:4])
        kind = tf.where(tf.equal(head[0], 0xFF), tf.gather(kinds, marker), _SKIP_ONE)
        # Pillow reads a length below 2 as an empty segment, so the walk always moves on.
        end = pos + 2 + tf.maximum(length, 2)
        complete = end <= size  # a cut segment makes Pillow reject the file
        segment = tf.equal(kind, _SEGMENT)
        hit = segment & complete & tf.equal(marker, 0xE1) & (length >= 8) & _equals(head[4:10], _EXIF_PREFIX)
        next_pos = tf.where(segment, end, pos + 1 + tf.cast(tf.equal(kind, _SKIP_TWO), tf.int64))
        stop = (pos + 2 > size) | tf.equal(kind, _STOP) | (segment & ~complete)
        return next_pos, hit, stop

    pos, found = _walk(step, 2)  # the walk starts at the 0xFF of the marker after SOI
    return pos + 4, tf.where(found, _big_endian(_bytes(data, size, pos + 2, 2)) - 2, 0), tf.constant(2, tf.int64)


def _png_exif(data: tf.Tensor, size: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """The first ``eXIf`` chunk's data, before or after the image data (Pillow reads both)."""
    def step(pos):
        head = _bytes(data, size, pos, 8)  # length (big-endian), chunk type
        end = pos + 12 + _big_endian(head[:4])  # data and CRC
        complete = (pos + 8 <= size) & (end <= size)
        hit = complete & _equals(head[4:], b"eXIf")
        stop = ~complete | ~_is_chunk_name(head[4:]) | _equals(head[4:], b"IEND")
        return end, hit, stop

    pos, found = _walk(step, 8)
    length = tf.where(found, _big_endian(_bytes(data, size, pos, 4)), 0)
    # Pillow puts "Exif\0\0" in front of the chunk data itself, so the data may carry one more.
    return pos + 8, length, tf.constant(1, tf.int64)


def _is_chunk_name(name: tf.Tensor) -> tf.Tensor:
    """Four letters, digits or underscores: Pillow stops reading a PNG at anything else."""
    digit = (name >= ord("0")) & (name <= ord("9"))
    letter = ((name >= ord("A")) & (name <= ord("Z"))) | ((name >= ord("a")) & (name <= ord("z")))
    return tf.reduce_all(digit | letter | tf.equal(name, ord("_")))


def _webp_exif(data: tf.Tensor, size: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """The ``EXIF`` chunk of an extended WebP whose VP8X header announces it.

    libwebp's demuxer, which Pillow uses, ignores metadata chunks in simple files, ones whose
    VP8X flag is not set and anything past the RIFF size.
    """
    header = _bytes(data, size, 0, 21)
    limit = tf.minimum(size, _little_endian(header[4:8]) + 8)
    extended = _equals(header[12:16], b"VP8X") & tf.equal(tf.bitwise.bitwise_and(header[20], 0x08), 0x08)

    def step(pos):
        head = _bytes(data, size, pos, 8)  # chunk type, length (little-endian)
        length = _little_endian(head[4:])
        end = pos + 8 + length + tf.bitwise.bitwise_and(length, 1)  # chunks are padded to even sizes
        complete = (pos + 8 <= limit) & (end <= limit)
        return end, complete & _equals(head[:4], b"EXIF"), ~complete

    pos, found = _walk(step, 12)
    length = tf.where(found & extended, _little_endian(_bytes(data, size, pos + 4, 4)), 0)
    return pos + 8, length, tf.constant(2, tf.int64)


def _strip_exif_prefixes(data: tf.Tensor, size: tf.Tensor, start: tf.Tensor, length: tf.Tensor,
                         prefixes: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Skips up to ``prefixes`` leading ``Exif\\0\\0`` headers, as Pillow's Exif.load does."""
    for i in range(2):
        present = (prefixes > i) & (length >= 6) & _equals(_bytes(data, size, start, 6), _EXIF_PREFIX)
        start, length = tf.where(present, start + 6, start), tf.where(present, length - 6, length)
    return start, length


# --- the TIFF structure inside the EXIF block -------------------------------------------------


def _tiff_orientation(data: tf.Tensor, size: tf.Tensor, start: tf.Tensor, length: tf.Tensor) -> tf.Tensor:
    """Orientation from IFD0 of the TIFF block ``data[start:start + length]``; 1 if there is none."""
    head = _bytes(data, size, start, 8)
    magic_ok = tf.reduce_any([_equals(head[:4], magic) for magic in _TIFF_MAGICS])
    valid = (length >= 8) & magic_ok
    little = tf.equal(head[0], ord("I"))
    ifd = _unsigned(head[4:8], little)
    count = _unsigned(_bytes(data, size, start + ifd, 2), little)
    # Pillow reads the entries that fit and stops at the first cut one.
    fits = tf.maximum((length - ifd - 2) // 12, 0)
    entries_n = tf.where(valid & (ifd + 2 <= length), tf.minimum(tf.minimum(count, fits), MAX_ENTRIES), 0)
    entries = tf.reshape(_read(data, size, start + ifd + 2, entries_n * 12), [-1, 12])
    found, index = _orientation_entry(entries, little, length)

    def value():
        entry = entries[index]
        field_type = _unsigned(entry[2:4], little)
        value_size = _unsigned(entry[4:8], little) * _type_size(field_type)
        # Values of up to 4 bytes sit in the entry itself, longer ones at an offset in the block.
        value_pos = start + tf.where(value_size > 4, _unsigned(entry[8:12], little), ifd + 2 + 12 * index + 8)
        number = _first_value(_bytes(data, size, value_pos, 8), field_type, little)
        return tf.cast(tf.where((number >= 1) & (number <= 8), number, 1), tf.int32)
    return tf.cond(found, value, lambda: tf.constant(1, tf.int32))


def _type_size(field_type: tf.Tensor) -> tf.Tensor:
    return tf.gather(tf.constant(_TYPE_SIZES, tf.int64), tf.minimum(field_type, len(_TYPE_SIZES) - 1))


def _orientation_entry(entries: tf.Tensor, little: tf.Tensor, limit: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Whether Pillow keeps an Orientation entry from these ``[n, 12]`` IFD entries, and which one.

    Pillow goes through the entries in order: it skips repeats of a tag it already stored, unknown
    types, empty values and (once their sizes add up past the block) out-of-line values, stops at
    the first value that lies past the end, and keeps the first Orientation it stores. Each step
    depends on the ones before, so this is a loop; it ends at that Orientation entry, which real
    files put among the first few.
    """
    tags = _unsigned(entries[:, 0:2], little)
    sizes = _unsigned(entries[:, 4:8], little) * _type_size(_unsigned(entries[:, 2:4], little))
    known = _type_size(_unsigned(entries[:, 2:4], little)) > 0
    offsets = _unsigned(entries[:, 8:12], little)
    positions = tf.range(tf.shape(tags, out_type=tf.int64)[0])

    def body(i, total, stored, found, done):
        tag, size = tags[i], sizes[i]
        counted = known[i] & ~tf.reduce_any(stored & tf.equal(tags, tag))
        out_of_line = counted & (size > 4)
        total = total + tf.where(out_of_line, size, 0)
        skipped = out_of_line & (total > limit)
        cut = out_of_line & ~skipped & (offsets[i] + size > limit)
        store = counted & ~skipped & ~cut & (size > 0)
        hit = store & tf.equal(tag, ORIENTATION_TAG)
        stored = stored | (store & tf.equal(positions, i))
        return i + 1, total, stored, tf.where(hit, i, found), hit | cut

    loop_vars = (tf.constant(0, tf.int64), tf.constant(0, tf.int64), tf.zeros_like(known),
                 tf.constant(-1, tf.int64), tf.constant(False))
    _, _, _, found, _ = tf.while_loop(lambda i, total, stored, found, done: ~done & (i < tf.size(tags, tf.int64)),
                                      body, loop_vars)
    return found >= 0, tf.maximum(found, 0)


def _first_value(raw: tf.Tensor, field_type: tf.Tensor, little: tf.Tensor) -> tf.Tensor:
    """The first value of a field as a whole number, or 0 when it is not one.

    ``exif_transpose`` looks the value up in a dict keyed by int, so every number type that equals
    a whole number counts (a LONG 6, a RATIONAL 12/2, a FLOAT 6.0), while BYTE, ASCII and
    UNDEFINED values are bytes or text and never match.
    """
    first, second = _unsigned(raw[0:4], little), _unsigned(raw[4:8], little)
    low, high = tf.where(little, first, second), tf.where(little, second, first)
    as_long8 = tf.where(tf.equal(high, 0), low, 0)
    bits64 = tf.bitwise.bitwise_or(tf.bitwise.left_shift(high, 32), low)
    as_double = _whole(tf.bitcast(bits64, tf.float64))
    as_float = _whole(tf.cast(tf.bitcast(tf.cast(first, tf.uint32), tf.float32), tf.float64))
    ratio = _ratio(first, second)
    signed_ratio = _ratio(_signed32(first), _signed32(second))
    choices = [
        (_SHORT, _unsigned(raw[0:2], little)), (_SSHORT, _unsigned(raw[0:2], little)),
        (_LONG, first), (_SLONG, first), (_IFD, first), (_SBYTE, raw[0]), (_LONG8, as_long8),
        (_RATIONAL, ratio), (_SRATIONAL, signed_ratio), (_FLOAT, as_float), (_DOUBLE, as_double),
    ]
    value = tf.constant(0, tf.int64)
    for number, candidate in choices:
        value = tf.where(tf.equal(field_type, number), candidate, value)
    return value


def _signed32(value: tf.Tensor) -> tf.Tensor:
    return tf.where(value >= 2 ** 31, value - 2 ** 32, value)


def _ratio(numerator: tf.Tensor, denominator: tf.Tensor) -> tf.Tensor:
    """numerator / denominator when that is a whole number, else 0 (Pillow reads x/0 as NaN)."""
    nonzero = tf.not_equal(denominator, 0)
    safe = tf.where(nonzero, denominator, 1)
    quotient = tf.math.floordiv(numerator, safe)
    return tf.where(nonzero & tf.equal(quotient * safe, numerator), quotient, 0)


def _whole(value: tf.Tensor) -> tf.Tensor:
    """A float that is exactly a small whole number, as int64; else 0 (NaN and huge values too)."""
    small = (value >= 0) & (value <= 16)
    clipped = tf.where(small, value, 0.0)
    return tf.where(small & tf.equal(clipped, tf.round(clipped)), tf.cast(clipped, tf.int64), 0)
