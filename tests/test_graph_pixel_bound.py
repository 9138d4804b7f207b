"""The exported graph's image_bytes:0 (and the SavedModel's serving_default) refuse images whose
header announces more pixels than the graph's limit, before decoding: no decompression bomb for
anyone serving the graph, with TensorFlow Serving or import_graph_def."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from imageclf.graph_model import GraphModel
from imageclf.retrain import retrain
from imageclf.training import TrainConfig
from tests.demo_data import make_dataset

from .conftest import quick_options

LIMIT = 1_000_000


def one_colour_png(width: int, height: int) -> bytes:
    """A 1-bit grey PNG of one colour, built row by row: tiny on disk, ``width * height`` pixels decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = b"\0" + bytes((width + 7) // 8)  # filter byte, then the row's bits
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def encoded(fmt: str, width: int, height: int, **options) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_module):
    """A graph and SavedModel exported with --max_pixels 1,000,000, and one with the default limit."""
    out = tmp_path_factory.mktemp("pixel_bound")
    make_dataset(out / "data", per_class=6)
    graphs = {}
    for name, limit in (("small", LIMIT), ("default", None)):
        opts = quick_options(out / "data", out / name, tfhub_module=str(tiny_module),
                             saved_model_dir=str(out / name / "saved_model"),
                             training=TrainConfig(steps=10, eval_step_interval=10, progress=False))
        if limit:
            opts.max_pixels = limit
        result = retrain(opts, log=lambda line: None)
        graphs[name] = (result.graph, result.saved_model)
    return graphs


@pytest.mark.parametrize("fmt, options", [("PNG", {}), ("GIF", {}), ("BMP", {}), ("WEBP", {"lossless": True}),
                                          ("WEBP", {"quality": 50}), ("JPEG", {})])
def test_images_over_the_limit_are_refused_before_decoding(exported, fmt, options):
    graph, _ = exported["small"]
    model = GraphModel(graph)
    try:
        assert model.metadata["image_bytes_max_pixels"] == LIMIT
        fits = model.predict_encoded([encoded(fmt, 1000, 1000, **options)])  # exactly the limit
        assert fits.shape == (1, 3) and np.isclose(fits.sum(), 1)
        with pytest.raises(tf.errors.InvalidArgumentError, match="over the limit of 1,000,000 pixels") as info:
            model.predict_encoded([encoded(fmt, 1001, 1000, **options)])
        assert "[1000] [1001]" in str(info.value)  # height and width, as the header gave them
    finally:
        model.close()


def test_a_tiny_png_of_20000_by_20000_is_refused_by_the_default_limit(exported):
    bomb = one_colour_png(20_000, 20_000)
    assert len(bomb) < 100_000  # 400 million pixels in under 100 KB
    graph, saved_model = exported["default"]
    model = GraphModel(graph)
    try:
        with pytest.raises(tf.errors.InvalidArgumentError, match="over the limit of 40,000,000 pixels"):
            model.predict_encoded([bomb])
        assert model.predict_encoded([one_colour_png(300, 200)]).shape == (1, 3)
    finally:
        model.close()
    serving = tf.saved_model.load(str(saved_model)).signatures["serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="over the limit of 40,000,000 pixels"):
        serving(image_bytes=tf.constant([bomb]))
    assert serving(image_bytes=tf.constant([one_colour_png(300, 200)]))["scores"].shape == (1, 3)


def test_the_saved_model_refuses_what_the_graph_refuses(exported):
    _, saved_model = exported["small"]
    serving = tf.saved_model.load(str(Path(saved_model))).signatures["serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="over the limit of 1,000,000 pixels"):
        serving(image_bytes=tf.constant([encoded("PNG", 2000, 2000)]))
