"""TensorFlow Serving's request and response protos, to and from what the engine takes and gives.

No transport here (see grpc_api.py). Everything a client can get wrong in a request raises
RequestError, which TF Serving answers as INVALID_ARGUMENT. Answers are shaped as TF Serving
running our exported SavedModel shapes them: values in the typed ``*_val`` fields, which is
what its clients read (``float_val``, or ``tf.make_ndarray``).
"""

from __future__ import annotations

import math

import numpy as np
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    input_pb2,
    model_pb2,
    status_pb2,
)

from imageclf.engine.classify import Answer
from imageclf.engine.signatures import CLASSES, IMAGE_FEATURES, SCORES, Signature
from imageclf.errors import BadRequestError, echo_list
from service.tfs_model import DTYPE_NAMES, VersionStatus, check_label

DTYPES = {dtype: types_pb2.DataType.Value(name) for dtype, name in DTYPE_NAMES.items()}
#: StatusProto's error codes (tensorflow.error.Code), by name.
_ERROR_CODES = status_pb2.StatusProto.DESCRIPTOR.fields_by_name["error_code"].enum_type


class RequestError(BadRequestError):
    """A malformed request, or one that does not fit the signature (INVALID_ARGUMENT)."""


def requested_model(spec: model_pb2.ModelSpec) -> tuple[str, int | None]:
    """The model name and version (None: the served one) a request's ``model_spec`` asks for."""
    if not spec.name:
        raise RequestError("model_spec.name is empty: name a model (GET /models lists them)")
    if spec.version_label:
        check_label(spec.version_label)
        return spec.name, None  # a known label names the served version
    return spec.name, spec.version.value if spec.HasField("version") else None


def reply_spec(name: str, version: int, signature_name: str = "") -> model_pb2.ModelSpec:
    spec = model_pb2.ModelSpec(name=name, signature_name=signature_name)
    spec.version.value = version
    return spec


def input_tensor(inputs, signature: Signature) -> tensor_pb2.TensorProto:
    """The one input tensor of ``signature`` from a PredictRequest's ``inputs`` map, type-checked."""
    spec = signature.input
    if set(inputs) != {spec.key}:
        raise RequestError(f"signature '{signature.name}' takes one input, '{spec.key}' ({_type_name(spec)}); "
                           f"the request has {echo_list(sorted(inputs)) if inputs else 'none'}")
    tensor = inputs[spec.key]
    if tensor.dtype != DTYPES[spec.dtype]:
        hint = " (cast with np.float32 before tf.make_tensor_proto)" if spec.dtype == "float32" else ""
        raise RequestError(f"input '{spec.key}' must be {_dtype_name(DTYPES[spec.dtype])}, "
                           f"not {_dtype_name(tensor.dtype)}{hint}")
    return tensor


def tensor_shape(tensor: tensor_pb2.TensorProto) -> tuple[int, ...]:
    """The declared shape of a request tensor, every dimension known."""
    if tensor.tensor_shape.unknown_rank or any(d.size < 0 for d in tensor.tensor_shape.dim):
        raise RequestError("input tensors must have a fully known shape")
    return tuple(d.size for d in tensor.tensor_shape.dim)


def string_values(tensor: tensor_pb2.TensorProto, key: str) -> list[bytes]:
    """Encoded images from a DT_STRING tensor of shape ``[n]``."""
    shape = tensor_shape(tensor)
    if len(shape) != 1:
        raise RequestError(f"input '{key}' must be a 1-D string tensor [n] of encoded images, not shape {list(shape)}")
    if len(tensor.string_val) != shape[0]:
        raise RequestError(f"input '{key}' has shape [{shape[0]}] but {len(tensor.string_val)} values")
    return list(tensor.string_val)


def float_array(tensor: tensor_pb2.TensorProto, shape: tuple[int, ...]) -> np.ndarray:
    """The values of a DT_FLOAT tensor, exactly as many as its shape holds (no padding, no broadcast)."""
    count = math.prod(shape)
    if tensor.tensor_content:
        if len(tensor.tensor_content) != 4 * count:
            raise RequestError(f"tensor_content has {len(tensor.tensor_content):,} bytes; shape {list(shape)} "
                               f"takes {4 * count:,}")
        return np.frombuffer(tensor.tensor_content, "<f4").reshape(shape)
    if len(tensor.float_val) != count:
        raise RequestError(f"float_val has {len(tensor.float_val):,} values; shape {list(shape)} takes {count:,}")
    return np.asarray(tensor.float_val, np.float32).reshape(shape)


def wanted_outputs(output_filter, signature: Signature) -> list[str]:
    """The outputs to answer: those of ``output_filter``, or all of the signature's."""
    wanted = list(dict.fromkeys(output_filter)) or [o.key for o in signature.outputs]
    unknown = [key for key in wanted if signature.output(key) is None]
    if unknown:
        raise RequestError(f"output_filter names {echo_list(unknown)}, which signature '{signature.name}' does not "
                           f"have (it has {[o.key for o in signature.outputs]})")
    return wanted


def output_tensors(answer: Answer, keys: list[str]) -> dict[str, tensor_pb2.TensorProto]:
    """``scores`` float32 ``[n, classes]`` and ``classes`` string ``[n, classes]``, as asked."""
    n, width = answer.scores.shape
    tensors = {}
    if SCORES in keys:
        tensors[SCORES] = _tensor(types_pb2.DT_FLOAT, (n, width))
        tensors[SCORES].float_val.extend(answer.scores.astype(np.float32).ravel().tolist())
    if CLASSES in keys:
        tensors[CLASSES] = _tensor(types_pb2.DT_STRING, (n, width))
        tensors[CLASSES].string_val.extend([label.encode("utf-8") for label in answer.labels] * n)
    return tensors


def signature_def_map(signatures: dict[str, Signature]) -> get_model_metadata_pb2.SignatureDefMap:
    """GetModelMetadata's ``signature_def``: the same SignatureDefs as our exported SavedModel's."""
    result = get_model_metadata_pb2.SignatureDefMap()
    for name, signature in signatures.items():
        definition = result.signature_def[name]
        definition.method_name = signature.method_name
        definition.inputs[signature.input.key].CopyFrom(_tensor_info(signature.input))
        for output in signature.outputs:
            definition.outputs[output.key].CopyFrom(_tensor_info(output))
    return result


def version_status(status: VersionStatus) -> get_model_status_pb2.ModelVersionStatus:
    """GetModelStatus' entry for one version (the same that REST writes as JSON)."""
    states = get_model_status_pb2.ModelVersionStatus.State
    return get_model_status_pb2.ModelVersionStatus(
        version=status.version, state=states.Value(status.state),
        status=status_pb2.StatusProto(error_code=_ERROR_CODES.values_by_name[status.error_code].number,
                                      error_message=status.error_message))


def example_images(request_input: input_pb2.Input) -> list[bytes]:
    """The encoded image of each tf.Example of a Classify request (see IMAGE_FEATURES)."""
    kind = request_input.WhichOneof("kind")
    if kind == "example_list":
        examples, context = request_input.example_list.examples, None
    elif kind == "example_list_with_context":
        examples, context = request_input.example_list_with_context.examples, \
            request_input.example_list_with_context.context
    else:
        raise RequestError("input has no examples: send input.example_list of tf.train.Example, "
                           f"each with the image bytes in the '{IMAGE_FEATURES[0]}' feature")
    return [_example_image(i, example, context) for i, example in enumerate(examples)]


def classification_result(answer: Answer) -> classification_pb2.ClassificationResult:
    """Every (label, score) for each image, in label order, as REST ``:classify`` lists them."""
    result = classification_pb2.ClassificationResult()
    for row in answer.scores:
        classes = result.classifications.add().classes
        for label, score in zip(answer.labels, row, strict=True):
            classes.add(label=label, score=float(score))
    return result


def _example_image(i: int, example, context) -> bytes:
    for features in (example.features.feature, context.features.feature if context is not None else {}):
        for name in IMAGE_FEATURES:
            if name in features:
                values = features[name].bytes_list.value
                if len(values) != 1:
                    raise RequestError(f"example {i}: feature '{name}' must hold one bytes value, "
                                       f"not {len(values)}")
                return values[0]
    raise RequestError(f"example {i} has no image: put the encoded image in a bytes feature named "
                       f"'{IMAGE_FEATURES[0]}' (or '{IMAGE_FEATURES[1]}')")


def _tensor(dtype: int, shape: tuple[int, ...]) -> tensor_pb2.TensorProto:
    return tensor_pb2.TensorProto(dtype=dtype, tensor_shape=_shape(shape))


def _shape(shape: tuple[int, ...]) -> tensor_shape_pb2.TensorShapeProto:
    return tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in shape])


def _tensor_info(spec) -> meta_graph_pb2.TensorInfo:
    return meta_graph_pb2.TensorInfo(name=spec.tensor_name, dtype=DTYPES[spec.dtype], tensor_shape=_shape(spec.shape))


def _type_name(spec) -> str:
    return f"{_dtype_name(DTYPES[spec.dtype])} {list(spec.shape)}"


def _dtype_name(dtype: int) -> str:
    try:
        return types_pb2.DataType.Name(dtype)
    except ValueError:
        return f"dtype {dtype}"
