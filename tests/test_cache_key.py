"""The bottleneck cache is keyed by everything that decides a vector, decoder versions included."""

from __future__ import annotations

import PIL
import pytest
import tensorflow as tf
from PIL import features

from imageclf.bases import load_base
from imageclf.bottlenecks import cache_key
from imageclf.retrain import retrain
from tests.demo_data import make_dataset

from .conftest import quick_options


@pytest.fixture(scope="module")
def base(tiny_module):
    return load_base(str(tiny_module))


def test_the_key_is_stable(base, tiny_module):
    assert cache_key(base) == cache_key(base) == cache_key(load_base(str(tiny_module)))


@pytest.mark.parametrize("upgrade", ["pillow", "libjpeg", "libwebp", "tensorflow"])
def test_a_decoder_upgrade_changes_the_key(base, monkeypatch, upgrade):
    before = cache_key(base)
    real_version = features.version
    if upgrade == "pillow":
        monkeypatch.setattr(PIL, "__version__", "99.0.0")
    elif upgrade == "tensorflow":
        monkeypatch.setattr(tf, "__version__", "9.99.0")
    else:
        feature = {"libjpeg": "jpg", "libwebp": "webp"}[upgrade]
        monkeypatch.setattr(features, "version", lambda name: "99.0" if name == feature else real_version(name))
    assert cache_key(base) != before


def test_after_a_decoder_upgrade_a_retrain_recomputes_every_vector(tmp_path, tiny_module, monkeypatch):
    data = tmp_path / "data"
    make_dataset(data, per_class=4)
    opts = quick_options(data, tmp_path, tfhub_module=str(tiny_module))
    first = retrain(opts, log=lambda line: None)
    assert (first.bottlenecks.computed, first.bottlenecks.reused) == (12, 0)
    assert retrain(opts, log=lambda line: None).bottlenecks.reused == 12
    monkeypatch.setattr(PIL, "__version__", "99.0.0")  # a new Pillow may decode a level or two differently
    upgraded = retrain(opts, log=lambda line: None)
    assert (upgraded.bottlenecks.computed, upgraded.bottlenecks.reused) == (12, 0)
