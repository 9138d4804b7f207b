"""The Open Inference Protocol v2 (KServe v2, Triton's HTTP/gRPC API) over the engine, transport-free.

v2_api.py (HTTP/JSON with the binary tensor data extension) and v2_grpc.py (GRPCInferenceService)
turn their requests into ``InputTensor`` and ``OutputRequest`` and their answers from
``OutputTensor``; everything in between is here, so both behave the same. The engine does the
work as for every other front end: ``Engine.classify`` for encoded images, ``Engine.classify_pixels``
for pixels, so the limits, the decode budget and batching are those of /v1 and TF Serving's gRPC.

Each model has two inputs, of which a request gives one, and two outputs (the names of our
TF Serving signatures, see imageclf.engine.signatures):

- ``image_bytes``: BYTES ``[-1]`` (``[n]`` or ``[n, 1]``), encoded images (JPEG, PNG, ...);
- ``images``: FP32 ``[-1, H, W, 3]``, RGB in [0, 1] at the model's input size;
- ``scores``: FP32 ``[-1, classes]``; ``classes``: BYTES ``[-1, classes]`` (the labels, in score order).

The classification extension (an output requested with ``parameters.classification: k``)
answers ``scores`` as BYTES ``[n, k]`` of ``"score:index:label"``, best first, as Triton does.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from imageclf import __version__
from imageclf.engine.budget import BudgetBusyError, BudgetExceededError
from imageclf.engine.classify import Answer, Engine, TooManyPixelsError, VersionNotFoundError
from imageclf.engine.signatures import CLASSES, SCORES, signatures
from imageclf.errors import BadRequestError, BusyError, echo, echo_list

SERVER_NAME = "imageclf"
EXTENSIONS = ("classification", "binary_tensor_data")
PLATFORM = "tensorflow_graphdef"
BYTES_INPUT, PIXELS_INPUT = "image_bytes", "images"
DATATYPES = {"string": "BYTES", "float32": "FP32"}
#: What parsed JSON may take in memory per byte of its text, at worst (nested empty lists and
#: objects: 21-26 bytes; floats 8, real pixel values 3). Parsing reserves this much of the
#: decode budget, so JSON tensors cannot take the process past it either.
JSON_BYTES_FACTOR = 32


class ProtocolError(BadRequestError):
    """A request that does not follow the protocol or fit the model (HTTP 400, INVALID_ARGUMENT)."""


@dataclass
class InputTensor:
    """One input of an infer request: its values either raw (binary) or as JSON ``data``."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes | memoryview | None = None
    data: object = None
    base64: bool = False       # BYTES elements are base64 text (parameters.content_type "base64")


@dataclass(frozen=True)
class OutputRequest:
    name: str
    classification: int = 0    # top k as "score:index:label" (0: the tensor itself)
    binary: bool = False       # HTTP only: the values as binary data after the JSON header


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    values: np.ndarray | list[bytes]
    binary: bool = False

    def raw(self) -> bytes:
        """The values as the binary extension and gRPC's raw contents carry them."""
        if self.datatype == "BYTES":
            return serialize_bytes(self.values)
        return np.ascontiguousarray(self.values, "<f4").tobytes()

    def json_data(self) -> list:
        """The values for JSON ``data``: flat, row-major (BYTES as UTF-8 text)."""
        if self.datatype == "BYTES":
            return [v.decode("utf-8", "replace") for v in self.values]
        return np.asarray(self.values, np.float32).ravel().tolist()


# -- metadata --


def server_metadata() -> dict:
    return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}


def model_metadata(engine: Engine, name: str, version: int | None) -> dict:
    """``{name, versions, platform, inputs, outputs}`` of the served version of ``name``."""
    with engine.hold(name, version) as servable:
        signature = signatures(servable.model)
        served = servable.version
    by_name = {s.input.key: s.input for s in signature.values()}
    outputs = next(iter(signature.values())).outputs
    return {"name": name, "versions": [str(served)], "platform": PLATFORM,
            "inputs": [_tensor_metadata(by_name[key]) for key in (BYTES_INPUT, PIXELS_INPUT)],
            "outputs": [_tensor_metadata(o) for o in outputs]}


def _tensor_metadata(spec) -> dict:
    return {"name": spec.key, "datatype": DATATYPES[spec.dtype], "shape": list(spec.shape)}


def model_ready(engine: Engine, name: str, version: int | None) -> None:
    """Return if the model (in that version) can answer now; raise the engine's error if not."""
    with engine.hold(name, version):
        pass


def parse_version(text: str | None) -> int | None:
    """A URL's or request's model version: empty is the served one; anything but a number is none served."""
    if not text:
        return None
    if not text.isdecimal() or len(text) > 19:
        raise VersionNotFoundError(f"model version '{echo(text)}' is not a version number")
    return int(text)


# -- requests --


@contextmanager
def json_reservation(engine: Engine, text_bytes: int) -> Iterator[None]:
    """Decode budget for parsing ``text_bytes`` of JSON and turning its tensors into arrays."""
    try:
        with engine.budget.reserve(JSON_BYTES_FACTOR * text_bytes):
            yield
    except BudgetExceededError as e:
        raise TooManyPixelsError(f"the JSON request body is too large to parse: {e} (send tensors as binary "
                                 "data)") from None
    except BudgetBusyError as e:
        raise BusyError(str(e)) from None


def check_shape(name: str, shape: object) -> tuple[int, ...]:
    if not isinstance(shape, list | tuple) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                      for d in shape):
        raise ProtocolError(f"input '{echo(name)}': shape must be a list of non-negative integers, "
                            f"not {echo(shape)}")
    return tuple(shape)


def compact(engine: Engine, tensor: InputTensor) -> InputTensor:
    """The tensor with its JSON ``data`` made raw: encoded images as bytes, pixels as an array.

    Run inside ``json_reservation``, so the parsed lists can be dropped before the model runs.
    The image count is checked before any base64 is decoded.
    """
    _check_input(tensor)
    if tensor.name == BYTES_INPUT:
        engine.check_count(tensor.shape[0])
        values = _bytes_elements(tensor)
        return InputTensor(tensor.name, tensor.datatype, tensor.shape, data=values)
    engine.check_count(tensor.shape[0])
    if tensor.raw is not None:
        return tensor
    try:
        array = np.asarray(tensor.data, np.float32)
    except (ValueError, TypeError):
        raise ProtocolError(f"input '{PIXELS_INPUT}': data must be numbers, flat or nested as the shape "
                            f"{list(tensor.shape)}") from None
    if array.size != math.prod(tensor.shape):
        raise ProtocolError(f"input '{PIXELS_INPUT}' has {array.size:,} values; its shape {list(tensor.shape)} "
                            f"takes {math.prod(tensor.shape):,}")
    return InputTensor(tensor.name, tensor.datatype, tensor.shape, data=array.reshape(tensor.shape))


def _check_input(tensor: InputTensor) -> None:
    wanted = {BYTES_INPUT: "BYTES", PIXELS_INPUT: "FP32"}
    if tensor.name not in wanted:
        raise ProtocolError(f"unknown input '{echo(tensor.name)}': give one of '{BYTES_INPUT}' (BYTES [n]: encoded "
                            f"images) or '{PIXELS_INPUT}' (FP32 [n, height, width, 3] in [0, 1])")
    if tensor.datatype != wanted[tensor.name]:
        raise ProtocolError(f"input '{tensor.name}' must be {wanted[tensor.name]}, not {echo(tensor.datatype)}")
    if tensor.name == BYTES_INPUT and not (len(tensor.shape) == 1 or (len(tensor.shape) == 2 and
                                                                      tensor.shape[1] == 1)):
        raise ProtocolError(f"input '{BYTES_INPUT}' must have the shape [n] or [n, 1] (one encoded image each), "
                            f"not {list(tensor.shape)}")
    if tensor.name == PIXELS_INPUT and len(tensor.shape) != 4:
        raise ProtocolError(f"input '{PIXELS_INPUT}' must have the shape [n, height, width, 3] (n images), "
                            f"not {list(tensor.shape)}")
    if tensor.raw is None and tensor.data is None:
        raise ProtocolError(f"input '{tensor.name}' has no data: give 'data', or binary data "
                            "(parameters.binary_data_size)")


def _bytes_elements(tensor: InputTensor) -> list[bytes]:
    count = tensor.shape[0]
    if tensor.raw is not None:
        values = deserialize_bytes(tensor.raw, tensor.name)
    else:
        values = _flat_strings(tensor.data, tensor.name)
        if not tensor.base64:
            raise ProtocolError(f"input '{BYTES_INPUT}': JSON carries BYTES as UTF-8 text, which cannot hold an "
                                "encoded image; send the images as binary data, or as base64 text with "
                                'parameters {"content_type": "base64"}')
    if len(values) != count:
        raise ProtocolError(f"input '{tensor.name}' has {len(values):,} elements; its shape {list(tensor.shape)} "
                            f"takes {count:,}")
    if tensor.base64:
        return [_unbase64(i, v) for i, v in enumerate(values)]
    return values


def _flat_strings(data: object, name: str) -> list[bytes]:
    """JSON ``data`` of a BYTES tensor, flat or nested: UTF-8 bytes of each string."""
    flat: list[bytes] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, str):
            flat.append(item.encode("utf-8"))
        else:
            raise ProtocolError(f"input '{echo(name)}': BYTES data must be strings, not {type(item).__name__}")
    return flat


def _unbase64(i: int, value: bytes) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(f"input '{BYTES_INPUT}' element {i}: invalid base64") from None


def serialize_bytes(values: Sequence[bytes]) -> bytes:
    """BYTES elements as the binary extension carries them: each a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def deserialize_bytes(raw: bytes | memoryview, name: str) -> list[bytes]:
    view, values, at = memoryview(raw), [], 0
    while at < len(view):
        if at + 4 > len(view):
            raise ProtocolError(f"input '{echo(name)}': binary BYTES data ends inside an element's 4-byte length")
        (size,) = struct.unpack_from("<I", view, at)
        if at + 4 + size > len(view):
            raise ProtocolError(f"input '{echo(name)}': binary BYTES element {len(values)} is {size:,} bytes long, "
                                f"but only {len(view) - at - 4:,} remain")
        values.append(bytes(view[at + 4:at + 4 + size]))
        at += 4 + size
    return values


def one_input(inputs: Sequence[InputTensor]) -> InputTensor:
    """The request's one input (a request gives encoded images or pixels, not both)."""
    if len(inputs) != 1:
        given = echo_list([t.name for t in inputs]) if inputs else "none"
        raise ProtocolError(f"give exactly one input, '{BYTES_INPUT}' (BYTES: encoded images) or '{PIXELS_INPUT}' "
                            f"(FP32 pixels); the request has {given}")
    return inputs[0]


def classify(engine: Engine, name: str, version: int | None, tensor: InputTensor) -> Answer:
    """Scores for a request's input, compacted (see ``compact``)."""
    if tensor.name == BYTES_INPUT:
        return engine.classify(tensor.data, name, version=version)
    shape = tensor.shape
    if tensor.raw is not None:
        if len(tensor.raw) != 4 * math.prod(shape):
            raise ProtocolError(f"input '{PIXELS_INPUT}' has {len(tensor.raw):,} bytes of binary data; FP32 "
                                f"{list(shape)} takes {4 * math.prod(shape):,}")
        return engine.classify_pixels(shape, lambda: np.frombuffer(tensor.raw, "<f4").reshape(shape), name, version)
    return engine.classify_pixels(shape, lambda: tensor.data, name, version)


# -- answers --


def check_outputs(requested: Sequence[OutputRequest]) -> None:
    """Refuse outputs the models do not have, or a classification of labels, before any work."""
    for out in requested:
        if out.name not in (SCORES, CLASSES):
            raise ProtocolError(f"unknown output '{echo(out.name)}': the models have '{SCORES}' and '{CLASSES}'")
        if out.classification < 0 or (out.classification and out.name != SCORES):
            raise ProtocolError(f"classification must be a positive count, on the output '{SCORES}'")


def outputs(answer: Answer, requested: Sequence[OutputRequest], binary: bool) -> list[OutputTensor]:
    """The requested outputs (all, each ``binary`` as asked, when none are requested)."""
    requested = list(requested) or [OutputRequest(SCORES, binary=binary), OutputRequest(CLASSES, binary=binary)]
    n, width = answer.scores.shape
    tensors = []
    for out in requested:
        if out.classification:
            tensors.append(OutputTensor(out.name, "BYTES", (n, min(out.classification, width)),
                                        _top_k(answer, out.classification), out.binary))
        elif out.name == SCORES:
            tensors.append(OutputTensor(SCORES, "FP32", (n, width), answer.scores.astype(np.float32), out.binary))
        else:
            tensors.append(OutputTensor(CLASSES, "BYTES", (n, width),
                                        [label.encode("utf-8") for label in answer.labels] * n, out.binary))
    return tensors


def _top_k(answer: Answer, k: int) -> list[bytes]:
    """Triton's classification strings: ``score:index:label``, best first (the score as C++ std::to_string)."""
    values = []
    for row in answer.scores:
        for i in np.argsort(-row, kind="stable")[:k]:
            values.append(f"{float(row[i]):f}:{i}:{answer.labels[i]}".encode())
    return values
