"""Reading the arrays of a legacy (pre-1.6, not zip) PyTorch ``.pth`` file, without torch, safely.

Such a file is a run of pickles: a magic number, a protocol version, system info, the state
dict itself (tensors as calls of ``torch._utils._rebuild_tensor_v2`` on storages given by
persistent id), then the list of storage keys, then each storage's raw bytes, in that order,
each preceded by its element count. Unpickling runs whatever the pickle names, so the unpickler
here allows only what a weights file needs (an ordered dict, the tensor-rebuild function and
storage types) and refuses everything else: a file that names anything else is not weights.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
from pathlib import Path

import numpy as np

from imageclf.errors import UserError

_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
             "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
             "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}


class _StorageType:
    def __init__(self, name: str):
        self.dtype = np.dtype(_STORAGES[name])


class _Storage:
    def __init__(self, key: str, dtype: np.dtype, count: int):
        self.key, self.dtype, self.count = key, dtype, count
        self.array: np.ndarray | None = None


class _Tensor:
    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def array(self) -> np.ndarray:
        base = self.storage.array
        if not self.size:
            return base[self.offset:self.offset + 1].reshape(()).copy()
        item = base.itemsize
        view = np.lib.stride_tricks.as_strided(base[self.offset:], shape=self.size,
                                               strides=[s * item for s in self.stride])
        return np.ascontiguousarray(view)


def _rebuild_tensor(storage, offset, size, stride, *rest):
    return _Tensor(storage, offset, size, stride)


class _WeightsUnpickler(pickle.Unpickler):
    """Only an ordered dict of tensors: any other global in the file is refused."""

    def __init__(self, file, storages: dict[str, _Storage]):
        super().__init__(file)
        self.storages = storages

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refused: the file asks for {module}.{name}, which a weights file never does")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError("refused: an unknown persistent id")
        _, kind, key, _location, count = pid[:5]
        if key not in self.storages:
            self.storages[key] = _Storage(str(key), kind.dtype, int(count))
        return self.storages[key]


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Every named array of a legacy PyTorch weights file (UserError if it is not one, or is unsafe)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: {e.strerror}") from None
    try:
        return _read(io.BytesIO(data))
    except (pickle.UnpicklingError, EOFError, ValueError, struct.error, TypeError, AttributeError) as e:
        raise UserError(f"{path}: not a legacy PyTorch weights file ({e})") from None


def _read(stream: io.BytesIO) -> dict[str, np.ndarray]:
    storages: dict[str, _Storage] = {}
    if _plain_load(stream) != _MAGIC:
        raise ValueError("no PyTorch magic number (a zip-format file from torch >= 1.6 is not read here)")
    _plain_load(stream)  # protocol version
    info = _plain_load(stream)
    if not isinstance(info, dict) or not info.get("little_endian", False):
        raise ValueError("not a little-endian file")
    state = _WeightsUnpickler(stream, storages).load()
    keys = _plain_load(stream)
    if not isinstance(state, dict) or not isinstance(keys, list):
        raise ValueError("no state dict")
    for key in keys:
        storage = storages[key]
        (count,) = struct.unpack("<q", stream.read(8))
        raw = stream.read(count * storage.dtype.itemsize)
        if count != storage.count or len(raw) != count * storage.dtype.itemsize:
            raise ValueError(f"storage {key} is truncated")
        storage.array = np.frombuffer(raw, storage.dtype)
    out = {}
    for name, tensor in state.items():
        if not isinstance(tensor, _Tensor) or tensor.storage.array is None:
            raise ValueError(f"{name} is not a tensor")
        out[str(name)] = tensor.array()
    return out


def _plain_load(stream: io.BytesIO):
    """A pickle of plain values only (numbers, strings, lists, dicts)."""
    return _PlainUnpickler(stream).load()


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refused: {module}.{name}")
