"""Phone photos: every path (Python decode, image_bytes:0, SavedModel, service) gives the same features.

Parity is checked on bottleneck vectors, not on softmax scores, which saturate and hide
differences. Pictures have structure, so a wrong turn or a wrong scale shows.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from imageclf.graph_model import GraphModel
from imageclf.images import decode_image, jpeg_scale
from tests.demo_data import draw_shape

# Display transform of each EXIF orientation, and how a camera stores an upright picture for it.
STORE = {1: [], 2: [Image.Transpose.FLIP_LEFT_RIGHT], 3: [Image.Transpose.ROTATE_180],
         4: [Image.Transpose.FLIP_TOP_BOTTOM], 5: [Image.Transpose.TRANSPOSE], 6: [Image.Transpose.ROTATE_90],
         7: [Image.Transpose.TRANSVERSE], 8: [Image.Transpose.ROTATE_270]}


def photo(size=(1200, 900), seed=3) -> Image.Image:
    """A picture with structure at two scales: a shape, and a coloured block in one corner."""
    img = draw_shape("triangle", np.random.default_rng(seed), size)
    corner = Image.new("RGB", (size[0] // 5, size[1] // 4), (250, 220, 0))
    img.paste(corner, (0, 0))
    return img


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def turned(img: Image.Image, orientation: int, **kw) -> bytes:
    """``img`` stored as a camera would for ``orientation``, with the tag that turns it upright."""
    stored = img
    for op in STORE[orientation]:
        stored = stored.transpose(op)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, "JPEG", quality=92, exif=exif.tobytes(), **kw)


@pytest.fixture(scope="module")
def model(demo_model):
    m = GraphModel(demo_model.graph)
    yield m
    m.close()


def features(model: GraphModel, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Bottlenecks of one encoded image by the Python path (fed to Placeholder:0) and in the graph."""
    bottleneck = model.graph.get_tensor_by_name("bottleneck:0")
    pixels = decode_image(data, size=model.input_size)
    by_python = model.session.run(bottleneck, {model.input: model.model_input(pixels)[None]})[0]
    by_graph = model.session.run(bottleneck, {model.bytes_input: [data]})[0]
    return by_python, by_graph


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _cases() -> dict[str, bytes]:
    img = photo()
    sixteen = Image.fromarray(np.asarray(img.convert("L"), np.uint16) * 257)
    rgba = img.convert("RGBA")
    rgba.putalpha(128)
    return {
        "jpeg": encode(img, quality=92),
        "progressive": encode(img, quality=92, progressive=True),
        "cmyk": encode(img.convert("CMYK"), quality=92),
        "gray": encode(img.convert("L"), quality=92),
        "palette png": encode(img.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "rgba png": encode(rgba, "PNG"),
        "16-bit png": encode(sixteen, "PNG"),
        **{f"orientation {o}": turned(img, o) for o in range(1, 9)},
        "12 MP orientation 6": turned(photo((4032, 3024)), 6),
    }


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_python_and_graph_paths_give_the_same_bottleneck(model, name):
    by_python, by_graph = features(model, CASES[name])
    assert relative(by_python, by_graph) < 1e-3, f"{name}: relative L2 {relative(by_python, by_graph):.2e}"


def test_every_orientation_comes_out_upright(model):
    upright, _ = features(model, CASES["orientation 1"])
    sideways, _ = features(model, encode(photo().transpose(Image.Transpose.ROTATE_90), quality=92))
    for o in range(2, 9):
        by_python, by_graph = features(model, CASES[f"orientation {o}"])
        for got in (by_python, by_graph):
            assert relative(got, upright) < 0.05 < relative(sideways, upright), o


def test_a_12_mp_photo_is_decoded_at_reduced_scale_and_matches_its_small_version(model):
    big = photo((4032, 3024))
    assert jpeg_scale(4032, 3024, model.input_size) == 8
    pixels = decode_image(encode(big, quality=92), size=model.input_size)
    assert pixels.shape == (378, 504, 3)  # 1/8 in the DCT, never 12 MP in memory
    reduced = big.resize((504, 378), Image.Resampling.LANCZOS)
    small, _ = features(model, encode(reduced, quality=95))
    sideways, _ = features(model, encode(reduced.transpose(Image.Transpose.ROTATE_90), quality=95))
    by_python, by_graph = features(model, encode(big, quality=92))
    # The DCT's 1/8 scale is not Lanczos: close to the small version, far nearer than the same picture turned.
    bound = 0.4 * relative(sideways, small)
    assert relative(by_python, small) < min(bound, 0.08) and relative(by_graph, small) < min(bound, 0.08)


@pytest.mark.parametrize("width, height", [(4032, 3024), (3024, 4032), (1279, 1281), (640, 480), (320, 319),
                                           (161, 5000), (160, 160), (100, 80)])
def test_pillow_draft_and_graph_pick_the_same_scale(model, width, height):
    data = encode(Image.new("RGB", (width, height), (90, 120, 200)), quality=80)
    scale = jpeg_scale(width, height, model.input_size)
    pixels = decode_image(data, size=model.input_size)
    assert pixels.shape[:2] == (-(-height // scale), -(-width // scale))
    graph_pixels = tf.io.decode_jpeg(data, channels=3, ratio=scale, dct_method="INTEGER_ACCURATE").numpy()
    np.testing.assert_array_equal(pixels, graph_pixels)


def test_saved_model_gives_the_frozen_graphs_scores_for_turned_photos(model, demo_model):
    loaded = tf.saved_model.load(str(demo_model.saved_model))
    images = [CASES["orientation 6"], CASES["12 MP orientation 6"], CASES["palette png"]]
    out = loaded.signatures["serving_default"](image_bytes=tf.constant(images))["scores"].numpy()
    np.testing.assert_allclose(out, model.predict_encoded(images), atol=1e-6)


def test_heic_is_decoded_by_pillow_and_refused_clearly_by_the_graph(model):
    pytest.importorskip("pillow_heif")
    heic = encode(photo((400, 300)), "HEIF", quality=90)
    pixels = decode_image(heic, size=model.input_size)
    assert pixels.shape == (300, 400, 3) and pixels[5, 5, 0] > 200  # the yellow corner
    with pytest.raises(tf.errors.InvalidArgumentError, match="HEIC/HEIF images cannot be decoded inside"):
        model.predict_encoded([heic])
