"""The signatures a served graph answers, as TensorFlow Serving clients know them.

They are those of the SavedModel that ``retrain.py --saved_model_dir`` exports (see
export.write_saved_model), so a client written against TF Serving running that export works
unchanged against this service, whatever the protocol:

- ``serving_default``: input ``image_bytes``, string ``[-1]`` (encoded images);
- ``predict_images``: input ``images``, float32 ``[-1, H, W, 3]``, RGB in [0, 1];
- both: outputs ``scores``, float32 ``[-1, classes]``, and ``classes``, string ``[-1, classes]``
  (every label, in score order, for each image).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from imageclf.errors import BadRequestError, echo

if TYPE_CHECKING:
    from imageclf.classifier import Classifier

DEFAULT_SIGNATURE = "serving_default"
PIXELS_SIGNATURE = "predict_images"
PREDICT_METHOD = "tensorflow/serving/predict"
SCORES, CLASSES = "scores", "classes"
#: The tensor behind ``classes`` in the SavedModel: the one tf.tile op that export._build_saved_model
#: adds (the frozen graph has no such tensor). Metadata names it so it equals the export's own.
CLASSES_TENSOR = "Tile:0"
#: tf.Example features that hold an encoded image (Classify), in the order they are looked for.
#: ``image/encoded`` is the name TF-Slim and the Object Detection API write image bytes under.
IMAGE_FEATURES = ("image/encoded", "image_bytes")


@dataclass(frozen=True)
class TensorSpec:
    key: str                    # the alias clients use
    dtype: str                  # "string" or "float32"
    shape: tuple[int, ...]      # -1: any size
    tensor_name: str = ""       # the tensor in the served graph, where there is one


@dataclass(frozen=True)
class Signature:
    name: str
    input: TensorSpec
    outputs: tuple[TensorSpec, ...]
    method_name: str = PREDICT_METHOD

    @property
    def takes_pixels(self) -> bool:
        return self.input.dtype == "float32"

    def output(self, key: str) -> TensorSpec | None:
        return next((o for o in self.outputs if o.key == key), None)


class UnknownSignatureError(BadRequestError):
    """No signature of that name."""

    kind = "unknown_signature"


def signatures(model: Classifier | None = None) -> dict[str, Signature]:
    """Both signatures, by name. Without ``model``, the sizes a model fixes (its input size, its
    number of classes) are -1: enough to check a request before a model is picked."""
    height, width = model.input_size if model else (-1, -1)
    classes = len(model.labels) if model else -1
    encoded = (model.bytes_input_name or "") if model else ""
    # Only graphs that retrain.py writes (those with an image_bytes input) have an export to name.
    outputs = (TensorSpec(SCORES, "float32", (-1, classes), model.output_name if model else ""),
               TensorSpec(CLASSES, "string", (-1, classes), CLASSES_TENSOR if encoded else ""))
    # Graphs from the older scripts take (p - mean) / std; the service scales [0, 1] pixels for them.
    pixels = model.input_name if model and (model.input_mean, model.input_std) == (0.0, 255.0) else ""
    return {
        DEFAULT_SIGNATURE: Signature(DEFAULT_SIGNATURE, TensorSpec("image_bytes", "string", (-1,), encoded), outputs),
        PIXELS_SIGNATURE: Signature(PIXELS_SIGNATURE,
                                    TensorSpec("images", "float32", (-1, height, width, 3), pixels), outputs),
    }


def signature_named(name: str) -> Signature:
    """The signature a request names (with sizes -1); an empty name is ``serving_default``, as in TF Serving."""
    found = signatures().get(name or DEFAULT_SIGNATURE)
    if found is None:
        raise UnknownSignatureError(f"unknown signature '{echo(name)}': the models here have '{DEFAULT_SIGNATURE}' "
                                    f"(input image_bytes: encoded images) and '{PIXELS_SIGNATURE}' "
                                    "(input images: float32 [n, height, width, 3] in [0, 1])")
    return found
