"""Bottlenecks by LiteRT (retrain's default): TensorFlow's vectors, kept apart in the cache."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from imageclf.bases import load_base
from imageclf.bottlenecks import BottleneckCache, cache_key, get_bottlenecks, with_runtime
from imageclf.retrain import retrain
from imageclf.training import TrainConfig
from tests.demo_data import make_dataset

from .conftest import quick_options

pytest.importorskip("ai_edge_litert")


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("pictures"), per_class=4)


@pytest.mark.parametrize("which", ["builtin", "tiny", "frozen"])
def test_litert_vectors_match_tensorflows(which, pictures, tiny_module, frozen_base):
    base = {"builtin": lambda: load_base("builtin"), "tiny": lambda: load_base(str(tiny_module)),
            "frozen": lambda: load_base(str(frozen_base.graph), frozen_base.spec())}[which]()
    lite, why_not = with_runtime(base, "litert")
    assert why_not is None and lite.runtime == "litert" and base.runtime == "tf"
    by_tf, _ = get_bottlenecks(pictures, base, None, progress=False)
    by_litert, _ = get_bottlenecks(pictures, lite, None, progress=False, batch_size=5)  # batches of other sizes
    for path in pictures:
        scale = max(1.0, float(np.abs(by_tf[path]).max()))
        np.testing.assert_allclose(by_litert[path], by_tf[path], rtol=0, atol=1e-4 * scale, err_msg=str(path))


def test_the_runtime_is_part_of_the_cache_key(tiny_module, tmp_path):
    base = load_base(str(tiny_module))
    lite, _ = with_runtime(base, "litert")
    assert cache_key(base) != cache_key(lite)
    assert cache_key(with_runtime(lite, "tf")[0]) == cache_key(base)  # TensorFlow's folders are as before
    tf_cache, lite_cache = BottleneckCache(tmp_path, base), BottleneckCache(tmp_path, lite)
    tf_cache.put("ab" * 32, np.ones(base.bottleneck_size, np.float32))
    assert lite_cache.get("ab" * 32) is None


def test_a_base_litert_cannot_run_stays_on_tensorflow_saying_why(tiny_module):
    base = load_base(str(tiny_module))
    broken = dataclasses.replace(base, fingerprint="not-convertible", output_name="no_such_tensor:0")
    kept, why_not = with_runtime(broken, "litert")
    assert kept.runtime == "tf" and "LiteRT cannot run this base" in why_not


def test_retrain_says_what_computed_the_bottlenecks(tmp_path, tiny_module):
    make_dataset(tmp_path / "data", per_class=6)
    lines: list[str] = []
    for runtime in ("litert", "tf"):
        opts = quick_options(tmp_path / "data", tmp_path, tfhub_module=str(tiny_module), runtime=runtime,
                             training=TrainConfig(steps=10, eval_step_interval=10, progress=False))
        retrain(opts, log=lines.append)
    base_lines = [line for line in lines if line.startswith("Base model:")]
    assert "bottlenecks by LiteRT" in base_lines[0] and "bottlenecks by TensorFlow" in base_lines[1]
    computed = [line for line in lines if line.startswith("Bottlenecks:")]
    assert "reused 0" in computed[0] and "reused 0" in computed[1]  # each runtime has its own vectors
