"""EXIF orientation inside the graph (imageclf.exif_graph) agrees with Pillow, our reference decoder.

Pillow's ``ImageOps.exif_transpose`` is what the rest of the product applies, so every test
compares against it: the pixels it shows, and the orientation it acts on.
"""

from __future__ import annotations

import io
import random
import struct
import warnings
import zlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

from imageclf.exif_graph import apply_orientation, exif_orientation

ORIENTATION = 0x0112
SHORT, ASCII, LONG, RATIONAL, BYTE, UNDEFINED = 3, 2, 4, 5, 1, 7

# The transpose exif_transpose applies for each orientation, and the one that undoes it.
DISPLAY = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
           4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
           7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
UNDO = {**DISPLAY, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}

one_image = tf.function(exif_orientation, input_signature=[tf.TensorSpec([], tf.string)], autograph=False)


# --- building files -----------------------------------------------------------------------------


def upright_picture() -> np.ndarray:
    """48 wide, 32 high, a different colour in each corner so every flip and turn shows."""
    pixels = np.full((32, 48, 3), 128, np.uint8)
    pixels[:8, :8] = (255, 0, 0)
    pixels[:8, -16:] = (0, 255, 0)
    pixels[-8:, :8] = (0, 0, 255)
    pixels[-16:, -8:] = (255, 255, 0)
    pixels[12:20, 16:24] = (255, 255, 255)
    return pixels


def stored_as(orientation: int) -> Image.Image:
    """The upright picture as a camera stores it with this orientation."""
    img = Image.fromarray(upright_picture())
    return img if UNDO[orientation] is None else img.transpose(UNDO[orientation])


def encode(img: Image.Image, fmt: str = "JPEG", **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def pillow_jpeg(orientation: int) -> bytes:
    """What Pillow writes: SOI, APP0 JFIF, APP1 Exif (big-endian TIFF)."""
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    data = encode(stored_as(orientation), exif=exif, quality=95)
    assert data[2:4] == b"\xff\xe0" and data.index(b"Exif\0\0MM") < 40
    return data


def tiff(entries: list[tuple[int, int, int, bytes]], order: str = "<", tail: bytes = b"") -> bytes:
    """A TIFF block with one IFD right after the header: entries are (tag, type, count, 4-byte value field)."""
    magic = b"II*\x00" if order == "<" else b"MM\x00*"
    ifd = struct.pack(order + "H", len(entries))
    ifd += b"".join(struct.pack(order + "HHL", tag, kind, count) + field for tag, kind, count, field in entries)
    return magic + struct.pack(order + "L", 8) + ifd + bytes(4) + tail


def short(value: int, order: str = "<") -> bytes:
    return struct.pack(order + "HH", value, 0)


def with_app1(jpeg: bytes, payload: bytes, keep_jfif: bool = True, length: int | None = None) -> bytes:
    """``jpeg`` with its APP1 segments replaced by one carrying ``payload`` (right after SOI or APP0)."""
    segments, pos = [], 2
    while jpeg[pos + 1] != 0xDA:
        end = pos + 2 + struct.unpack(">H", jpeg[pos + 2:pos + 4])[0]
        if jpeg[pos + 1] != 0xE1 and (keep_jfif or jpeg[pos + 1] != 0xE0):
            segments.append(jpeg[pos:end])
        pos = end
    app1 = b"\xff\xe1" + struct.pack(">H", length or len(payload) + 2) + payload
    head = [segments.pop(0)] if segments and segments[0][1] == 0xE0 else []
    return jpeg[:2] + b"".join(head) + app1 + b"".join(segments) + jpeg[pos:]


def handmade_jpeg(orientation: int, order: str = "<", keep_jfif: bool = False) -> bytes:
    """Byte order Pillow does not write, Orientation after other tags, optionally without APP0."""
    entries = [(0x010F, ASCII, 4, b"Cam\0"), (0x0110, ASCII, 4, b"X1\0\0"),
               (ORIENTATION, SHORT, 1, short(orientation, order))]
    return with_app1(pillow_jpeg(orientation), b"Exif\0\0" + tiff(entries, order), keep_jfif)


def orientation_jpeg(entries: list[tuple[int, int, int, bytes]], **kwargs) -> bytes:
    return with_app1(pillow_jpeg(1), b"Exif\0\0" + tiff(entries, **kwargs))


# --- the reference ------------------------------------------------------------------------------


def pillow_orientation(data: bytes) -> int | None:
    """The orientation ``exif_transpose`` acts on, as imageclf.images uses it; None if Pillow rejects the file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        except Exception:  # noqa: BLE001 - a file Pillow cannot read is rejected before orientation matters
            return None
        try:
            value = img.getexif().get(ORIENTATION, 1)
            # exif_transpose looks the value up in a dict keyed by 2..8.
            return {k: k for k in range(2, 9)}.get(value, 1)
        except Exception:  # noqa: BLE001 - imageclf.images leaves the image as it is then
            return 1


def pillow_upright(data: bytes) -> np.ndarray:
    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))


@tf.function(input_signature=[tf.TensorSpec([], tf.string)], autograph=False)
def tf_upright(data: tf.Tensor) -> tf.Tensor:
    pixels = tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE")
    return apply_orientation(pixels, exif_orientation(data))


# --- pixels -------------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_apply_orientation_matches_pillow_transpose(orientation):
    stored = stored_as(orientation)
    want = np.asarray(stored if DISPLAY[orientation] is None else stored.transpose(DISPLAY[orientation]))
    got = apply_orientation(tf.constant(np.asarray(stored)), tf.constant(orientation)).numpy()
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, upright_picture())


@pytest.mark.parametrize("orientation", [0, 9, -1, 65535])
def test_apply_orientation_leaves_other_values_alone(orientation):
    pixels = np.asarray(stored_as(6))
    np.testing.assert_array_equal(apply_orientation(pixels, orientation).numpy(), pixels)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("make", [pillow_jpeg, handmade_jpeg, lambda o: handmade_jpeg(o, ">", keep_jfif=True)],
                         ids=["pillow-app0-big-endian", "no-app0-little-endian", "app0-handmade-big-endian"])
def test_jpeg_turns_upright_like_pillow(orientation, make):
    data = make(orientation)
    want = pillow_upright(data)
    got = tf_upright(tf.constant(data)).numpy()
    assert got.shape == want.shape == (32, 48, 3)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    # The stored pixels really were turned: the corners come back where they belong.
    assert np.abs(got.astype(int) - upright_picture().astype(int))[[4, 4, 28, 28], [4, 44, 4, 44]].max() < 40


@tf.function(input_signature=[tf.TensorSpec([], tf.string)], autograph=False)
def tf_upright_any(data: tf.Tensor) -> tf.Tensor:
    pixels = tf.io.decode_image(data, channels=3, expand_animations=False)
    return apply_orientation(pixels, exif_orientation(data))


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_png_and_webp_turn_upright_like_pillow(orientation, fmt):
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    data = encode(stored_as(orientation), fmt, exif=exif, **({"lossless": True} if fmt == "WEBP" else {}))
    got = tf_upright_any(tf.constant(data)).numpy()
    np.testing.assert_array_equal(got, pillow_upright(data))
    np.testing.assert_array_equal(got, upright_picture())


def test_output_shape_is_open():
    # Orientations 5 to 8 swap height and width, so even a fully known input shape gives [None, None, c].
    @tf.function(input_signature=[tf.TensorSpec([32, 48, 3], tf.uint8), tf.TensorSpec([], tf.int32)])
    def static_shape(pixels, orientation):
        out = apply_orientation(pixels, orientation)
        assert out.shape.as_list() == [None, None, 3]
        return out

    assert static_shape(upright_picture(), 6).shape == (48, 32, 3)


# --- the tag ------------------------------------------------------------------------------------


def long_ifd(order: str) -> bytes:
    """18 tags before Orientation, some with values stored out of line, then Exif and GPS pointers."""
    text = b"a long description of the picture\0"
    shorts = [(tag, SHORT, 1, short(tag & 0xFF, order)) for tag in range(0x0100, 0x010E)]
    texts = [0x010E, 0x010F, 0x0110, 0x0111]
    data_at = 8 + 2 + 12 * (len(shorts) + len(texts) + 3) + 4
    entries = shorts + [(tag, ASCII, len(text), struct.pack(order + "L", data_at + i * len(text)))
                        for i, tag in enumerate(texts)]
    entries += [(ORIENTATION, SHORT, 1, short(8, order)), (0x8769, LONG, 1, struct.pack(order + "L", 0)),
                (0x8825, LONG, 1, struct.pack(order + "L", 0))]
    return b"Exif\0\0" + tiff(entries, order, text * len(texts))


def segment(jpeg: bytes, marker: int) -> bytes:
    """The first segment with this marker, header included."""
    pos = jpeg.index(bytes([0xFF, marker]))
    return jpeg[pos:pos + 2 + struct.unpack(">H", jpeg[pos + 2:pos + 4])[0]]


def patched_tiff(tiff_block: bytes, ifd_offset: int | None = None, count: int | None = None) -> bytes:
    """A little-endian TIFF block with its IFD offset or entry count overwritten."""
    if ifd_offset is not None:
        tiff_block = tiff_block[:4] + struct.pack("<L", ifd_offset) + tiff_block[8:]
    if count is not None:
        tiff_block = tiff_block[:8] + struct.pack("<H", count) + tiff_block[10:]
    return tiff_block


def rational(numerator: int, denominator: int) -> bytes:
    return orientation_jpeg([(ORIENTATION, RATIONAL, 1, struct.pack("<L", 26))],
                            tail=struct.pack("<LL", numerator, denominator))


def webp_exif_prefixed(webp: bytes) -> bytes:
    """The WebP with "Exif\\0\\0" in front of its EXIF chunk's data, as some writers store it."""
    pos = webp.index(b"EXIF")
    size = struct.unpack("<L", webp[pos + 4:pos + 8])[0]
    payload = b"Exif\0\0" + webp[pos + 8:pos + 8 + size]
    chunk = b"EXIF" + struct.pack("<L", len(payload)) + payload + bytes(len(payload) % 2)
    body = webp[12:pos] + chunk + webp[pos + 8 + size + size % 2:]
    return b"RIFF" + struct.pack("<L", 4 + len(body)) + b"WEBP" + body


def png_with_exif(png: bytes, exif_data: bytes, after_image_data: bool) -> bytes:
    """The PNG with an eXIf chunk before its first IDAT or before IEND."""
    chunk = struct.pack(">L", len(exif_data)) + b"eXIf" + exif_data
    chunk += struct.pack(">L", zlib.crc32(chunk[4:]))
    pos = png.index(b"IEND" if after_image_data else b"IDAT") - 4
    return png[:pos] + chunk + png[pos:]


def other_formats() -> dict[str, tuple[bytes, int]]:
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    img = stored_as(6)
    webp = encode(img, "WEBP", exif=exif)
    assert webp[webp.index(b"EXIF") + 8:].startswith(b"MM\0*")
    return {
        "png-exif": (encode(img, "PNG", exif=exif), 6),
        "png-plain": (encode(img, "PNG"), 1),
        "png-exif-after-image-data": (png_with_exif(encode(img, "PNG"), exif.tobytes()[6:], True), 6),
        "png-exif-with-prefix": (png_with_exif(encode(img, "PNG"), exif.tobytes(), False), 6),
        "webp-exif": (webp, 6),
        "webp-exif-with-prefix": (webp_exif_prefixed(webp), 6),
        "webp-exif-flag-unset": (webp[:20] + bytes([webp[20] & ~0x08]) + webp[21:], 1),
        "webp-plain": (encode(img, "WEBP"), 1),
        "gif": (encode(img, "GIF"), 1),
        "bmp": (encode(img, "BMP"), 1),
    }


def corpus() -> dict[str, tuple[bytes, int]]:
    """name -> (file, the orientation Pillow acts on)."""
    plain = encode(stored_as(1), quality=95)
    six = pillow_jpeg(6)
    app1_at = six.index(b"\xff\xe1")
    six_entry = [(ORIENTATION, SHORT, 1, short(6))]
    cases = {f"pillow-{o}": (pillow_jpeg(o), o) for o in range(1, 9)}
    cases |= {f"little-endian-{o}": (handmade_jpeg(o), o) for o in range(1, 9)}
    cases |= {
        "many-tags-before-little": (with_app1(plain, long_ifd("<")), 8),
        "many-tags-before-big": (with_app1(plain, long_ifd(">")), 8),
        "no-exif": (plain, 1),
        "ascii-orientation": (orientation_jpeg([(ORIENTATION, ASCII, 2, b"6\0\0\0")]), 1),
        "byte-orientation": (orientation_jpeg([(ORIENTATION, BYTE, 1, b"\x06\0\0\0")]), 1),
        "undefined-orientation": (orientation_jpeg([(ORIENTATION, UNDEFINED, 1, b"\x06\0\0\0")]), 1),
        # Pillow reads any number type as a number and exif_transpose then acts on it.
        "long-orientation": (orientation_jpeg([(ORIENTATION, LONG, 1, struct.pack("<L", 6))]), 6),
        "rational-12/2": (rational(12, 2), 6),
        "rational-13/2": (rational(13, 2), 1),
        "rational-6/0": (rational(6, 0), 1),
        "two-shorts": (orientation_jpeg([(ORIENTATION, SHORT, 2, struct.pack("<HH", 3, 6))]), 3),
        "count-0": (orientation_jpeg([(ORIENTATION, SHORT, 0, short(6))]), 1),
        "value-0": (orientation_jpeg([(ORIENTATION, SHORT, 1, short(0))]), 1),
        "value-9": (orientation_jpeg([(ORIENTATION, SHORT, 1, short(9))]), 1),
        "value-0x0106": (orientation_jpeg([(ORIENTATION, SHORT, 1, short(0x0106))]), 1),
        "first-of-two-wins": (orientation_jpeg([(ORIENTATION, SHORT, 1, short(3)), *six_entry]), 3),
        "unknown-type-first-skipped": (orientation_jpeg([(ORIENTATION, 14, 1, short(3)), *six_entry]), 6),
        # Pillow stops reading the IFD at a value that lies past the end of the block.
        "cut-value-before": (orientation_jpeg([(0x010F, ASCII, 10, struct.pack("<L", 5000)),
                                               *six_entry]), 1),
        "ifd-offset-past-end": (with_app1(plain, b"Exif\0\0" + patched_tiff(tiff(six_entry), ifd_offset=25)), 1),
        "ifd-offset-far-past-end": (with_app1(plain, b"Exif\0\0" + patched_tiff(tiff(six_entry), ifd_offset=2**32 - 9)),
                                    1),
        # Pillow reads the entries that are there; the count is no reason to look past the segment.
        "huge-entry-count": (with_app1(plain, b"Exif\0\0" + patched_tiff(tiff(six_entry), count=0xFFFF)), 6),
        "entries-cut-by-segment-end": (with_app1(plain, (b"Exif\0\0" + tiff([*six_entry, (0x0131, SHORT, 1, short(1))]))
                                                 [:-10]), 6),
        "tiff-header-cut": (with_app1(plain, b"Exif\0\0II*\0\x08\0"), 1),
        "bigtiff-magic": (with_app1(plain, b"Exif\0\0II+\0" + tiff(six_entry)[4:]), 1),
        "double-exif-prefix": (with_app1(plain, b"Exif\0\0Exif\0\0" + tiff(six_entry)), 6),
        "exif-after-image-data": (plain + segment(six, 0xE1), 1),
        "junk-and-fill-before-app1": (six[:20] + b"\x00\x13\xff\xff" + six[20:], 6),
        "exif-app1-truncated": (six[:app1_at + 20], 1),
        "app1-length-past-end": (with_app1(plain, b"Exif\0\0" + tiff(six_entry), length=0xFFFF), 1),
        "length-0xffff-near-end": (six[:20] + b"\xff\xe2\xff\xff" + b"x" * 10, 1),
        "empty": (b"", 1),
        "garbage": (bytes(random.Random(7).randrange(256) for _ in range(3000)), 1),
        "jpeg-magic-only": (b"\xff\xd8\xff", 1),
        "png-magic-only": (b"\x89PNG\r\n\x1a\n", 1),
        "riff-magic-only": (b"RIFF\xff\xff\xff\xffWEBPVP8X", 1),
    }
    return cases | other_formats()


CORPUS = corpus()


@pytest.mark.parametrize("name", CORPUS)
def test_orientation_matches_pillow(name):
    data, expected = CORPUS[name]
    assert (pillow_orientation(data) or 1) == expected  # the case is what its name says
    assert one_image(tf.constant(data)).numpy() == expected


def test_segment_walk_is_bounded():
    # Thousands of empty segments before APP1: Pillow would walk them all; the graph gives up at a
    # fixed bound, returns "upright" and stays fast.
    six = pillow_jpeg(6)
    data = six[:2] + b"\xff\xfe\x00\x02" * 5000 + six[2:]
    assert one_image(tf.constant(data)).numpy() == 1


def mutants(count: int, seed: int = 20240611):
    """Damaged EXIF JPEGs: overwritten bytes and cuts, mostly inside the APP1 segment."""
    rng = random.Random(seed)
    bases = [pillow_jpeg(6), handmade_jpeg(8), handmade_jpeg(3, ">", keep_jfif=True),
             with_app1(encode(stored_as(1)), long_ifd("<"))]
    for _ in range(count):
        data = bytearray(rng.choice(bases))
        app1 = data.index(b"\xff\xe1")
        app1_end = app1 + 2 + struct.unpack(">H", data[app1 + 2:app1 + 4])[0]
        for _ in range(rng.randint(1, 4)):
            inside = rng.random() < 0.85
            pos = rng.randrange(app1, app1_end) if inside else rng.randrange(len(data))
            if rng.random() < 0.2:
                del data[pos:]
            elif data:
                pos = min(pos, len(data) - 1)
                data[pos] = rng.choice([0x00, 0x01, 0x06, 0x12, 0xFF, rng.randrange(256)])
        yield bytes(data)


def test_damaged_files_never_raise_and_agree_with_pillow():
    disagreements, compared = [], 0
    for data in mutants(300):
        got = int(one_image(tf.constant(data)).numpy())
        assert 1 <= got <= 8
        want = pillow_orientation(data)
        if want is not None:  # files Pillow rejects never reach orientation in the product
            compared += 1
            if got != want:
                disagreements.append((got, want, data[:64]))
    assert compared > 100
    assert not disagreements


# --- every way the functions run -------------------------------------------------------------


FILES = [pillow_jpeg(6), handmade_jpeg(3), handmade_jpeg(5, ">", keep_jfif=True)]


def test_eager():
    assert [int(exif_orientation(tf.constant(data))) for data in FILES] == [6, 3, 5]
    pixels = tf.io.decode_jpeg(FILES[0], channels=3, dct_method="INTEGER_ACCURATE")
    np.testing.assert_array_equal(apply_orientation(pixels, exif_orientation(FILES[0])).numpy(),
                                  pillow_upright(FILES[0]))


def test_tf_function_and_map_fn():
    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def batch(encoded):
        return tf.map_fn(tf_upright, encoded, fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8))

    got = batch(tf.constant(FILES)).numpy()
    np.testing.assert_array_equal(got, np.stack([pillow_upright(data) for data in FILES]))
    eager = tf.map_fn(exif_orientation, tf.constant(FILES), fn_output_signature=tf.int32)
    assert eager.numpy().tolist() == [6, 3, 5]


def test_tf1_graph_def_round_trip():
    graph = tf.Graph()
    with graph.as_default():
        encoded = tf.compat.v1.placeholder(tf.string, [None], name="image_bytes")

        def upright(data):
            pixels = tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE")
            return apply_orientation(pixels, exif_orientation(data))
        tf.identity(tf.map_fn(upright, encoded, fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8)),
                    name="upright")
        tf.identity(tf.map_fn(exif_orientation, encoded, fn_output_signature=tf.int32), name="orientation")
    graph_def = tf.compat.v1.GraphDef.FromString(graph.as_graph_def().SerializeToString())

    ops = {node.op for node in graph_def.node}
    ops |= {node.op for function in graph_def.library.function for node in function.node_def}
    assert not ops & {"PyFunc", "EagerPyFunc", "PyFuncStateless"}
    assert {"Substr", "DecodePaddedRaw"} <= ops  # the function bodies (map_fn, loops, cases) were searched too

    fresh = tf.Graph()
    with fresh.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    with tf.compat.v1.Session(graph=fresh) as session:
        pixels, orientation = session.run(["upright:0", "orientation:0"], {"image_bytes:0": FILES})
    assert orientation.tolist() == [6, 3, 5]
    np.testing.assert_array_equal(pixels, np.stack([pillow_upright(data) for data in FILES]))
