"""Bottleneck vectors: computed in batches with parallel decoding, cached on disk by content.

The cache folder is keyed by everything that decides a vector besides the picture: the base
model's fingerprint (its weights and how it is fed), its input size, the preprocessing
version, the versions of the decoders (Pillow, its codecs, TensorFlow, which resizes) and what
runs the base's forward pass (TensorFlow or LiteRT, see with_runtime).
Within it, entries are keyed by the SHA-256 of each image file's bytes, so renaming or
moving a picture costs nothing, and editing one recomputes just that one. Entries are written
atomically; an unreadable or malformed entry is recomputed.

Files are read under image_files.FileRules (no symlinks out of the image folder, a size cap,
the header checked first). A vector is cached under the hash of the very bytes it was decoded
from, hashed again at decoding: a file edited after the first look never files its new
content's vector under its old content's hash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from imageclf import preprocess
from imageclf.atomic import write_bytes_atomic
from imageclf.bases import BaseModel
from imageclf.errors import BadImageError
from imageclf.image_files import FileRules, content_key, read_image_bytes
from imageclf.images import DEFAULT_MAX_PIXELS, decode_image, decoder_versions
from imageclf.preprocess import pack_images
from imageclf.preprocess_graph import packed_to_model_input

# Built functions by (kind, base fingerprint, input size): loading a base graph and tracing it
# costs about a second, which repeated calls (a benchmark, a long-lived process) should pay once.
# The size is part of the key because one base file can be loaded at several input sizes.
_FUNCTIONS: dict[tuple[str, str, tuple[int, int]], Callable] = {}


def _memoized(kind: str, base: BaseModel, build: Callable[[], Callable]) -> Callable:
    if not base.reusable:
        # A fine-tuned base is made once and used once: kept here, every retrain of a long
        # --watch --fine_tune run would keep its own traced copy of MobileNetV2 alive.
        return build()
    key = (kind, base.fingerprint, tuple(base.input_size))
    if key not in _FUNCTIONS:
        _FUNCTIONS[key] = build()
    return _FUNCTIONS[key]


def feature_function(base: BaseModel) -> Callable[[tf.Tensor], tf.Tensor]:
    """The frozen base as a TF2 function: float32 ``[n, H, W, 3]`` in [0, 1] -> ``[n, D]``."""
    return _memoized("features", base, lambda: _wrap_frozen(base))


def _wrap_frozen(base: BaseModel) -> Callable[[tf.Tensor], tf.Tensor]:
    def imported():
        tf.compat.v1.import_graph_def(base.graph_def, name="")
    wrapped = tf.compat.v1.wrap_function(imported, [])
    return wrapped.prune(wrapped.graph.get_tensor_by_name(base.input_name),
                         wrapped.graph.get_tensor_by_name(base.output_name))


BOTTLENECK_RUNTIMES = ("tf", "litert")


def with_runtime(base: BaseModel, runtime: str) -> tuple[BaseModel, str | None]:
    """``base`` with its bottlenecks computed by ``runtime``, and why not, if LiteRT cannot run it.

    LiteRT runs the forward pass about twice as fast on CPU (benchmarks/bench_retrain.py); a base
    it cannot run (an op without a LiteRT kernel) stays on TensorFlow, with the reason returned.
    """
    if runtime not in BOTTLENECK_RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}")
    if runtime == base.runtime or not base.reusable:  # a fine-tuned base is used once: not worth converting
        return base, None
    if runtime == "tf":
        return dataclasses.replace(base, runtime="tf"), None
    from imageclf.litert_features import LiteFeaturesUnavailable

    try:
        _memoized("litert", base, lambda: _lite_features(base))
    except LiteFeaturesUnavailable as e:
        return base, f"bottlenecks computed by TensorFlow: LiteRT cannot run this base ({e})"
    return dataclasses.replace(base, runtime="litert"), None


def pixels_feature_function(base: BaseModel) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Packed decoded pixels (see preprocess.pack_images) -> bottlenecks as NumPy, batch by batch.

    With TensorFlow, one graph call resizes and runs the base; with LiteRT, the same resize (a
    graph call) feeds the interpreter.
    """
    signature = [tf.TensorSpec([None, 3], tf.uint8), tf.TensorSpec([None, 2], tf.int32)]
    if base.runtime == "litert":
        resize = _memoized("resize", base, lambda: tf.function(
            lambda flat, shapes: packed_to_model_input(flat, shapes, base.input_size), input_signature=signature))
        lite = _memoized("litert", base, lambda: _lite_features(base))
        return lambda flat, shapes: lite(resize(flat, shapes).numpy())
    features = feature_function(base)
    graph_call = _memoized("pixels", base, lambda: tf.function(
        lambda flat, shapes: features(packed_to_model_input(flat, shapes, base.input_size)),
        input_signature=signature))
    return lambda flat, shapes: graph_call(flat, shapes).numpy()


def _lite_features(base: BaseModel):
    from imageclf.litert_features import LiteFeatures

    return LiteFeatures(base)


def cache_key(base: BaseModel) -> str:
    """The cache folder name for ``base``: what besides the image decides its vectors.

    A frozen graph or size-agnostic module loaded at another ``--base_input_size`` keeps its
    fingerprint but sees other pixels; so does any base after a preprocessing change, or after
    an upgrade of a decoder (Pillow, libjpeg, libwebp...) or of TensorFlow (it resizes).
    """
    height, width = base.input_size
    decoders = json.dumps({**decoder_versions(), "tensorflow": tf.__version__}, sort_keys=True)
    key = (f"{base.fingerprint}|input {height}x{width}|preprocess {preprocess.PREPROCESS_VERSION}"
           f"|decoders {decoders}")
    if base.runtime != "tf":  # TensorFlow's vectors keep the folders they always had
        key += f"|runtime {base.runtime}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class BottleneckCache:
    """One ``.npy`` file per (base model, image content) under ``root``."""

    def __init__(self, root: str | os.PathLike, base: BaseModel):
        self.dir = Path(root) / cache_key(base)
        self.size = base.bottleneck_size

    def _path(self, key: str) -> Path:
        return self.dir / entry_name(key)

    def get(self, key: str) -> np.ndarray | None:
        """The cached vector, or None when absent or unreadable (it will be recomputed)."""
        try:
            data = self._path(key).read_bytes()
        except OSError:
            return None
        return vector_from_bytes(data, self.size)

    def put(self, key: str, vector: np.ndarray) -> None:
        write_bytes_atomic(self._path(key), vector_bytes(vector), durable=False)


# The entry layout and file format, public so that the Beam job (bottlenecks_job.py) writes the
# very same cache through tf.io.gfile (gs://...) without a second definition of either.
def entry_name(key: str) -> str:
    """Where the vector of the image whose bytes hash to ``key`` sits inside a cache folder."""
    return f"{key[:2]}/{key}.npy"


def vector_bytes(vector: np.ndarray) -> bytes:
    """A cache entry's content: the vector as a float32 ``.npy`` file."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(vector, np.float32), allow_pickle=False)
    return buffer.getvalue()


def vector_from_bytes(data: bytes, size: int) -> np.ndarray | None:
    """The vector in a cache entry, or None when it is malformed (it will be recomputed)."""
    try:
        vector = np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if vector.shape != (size,) or vector.dtype != np.float32 or not np.isfinite(vector).all():
        return None
    return vector


@dataclass
class BottleneckReport:
    computed: int = 0
    reused: int = 0
    skipped: list[str] = field(default_factory=list)  # one message per unusable file
    reasons: Counter = field(default_factory=Counter)  # skipped files by kind of problem
    keys: dict[Path, str] = field(default_factory=dict, repr=False)  # SHA-256 of each readable file's bytes

    def skip(self, error: BadImageError) -> None:
        self.skipped.append(str(error))
        self.reasons[error.reason] += 1

    def summary(self) -> str:
        return f"computed {self.computed:,}, reused {self.reused:,}, skipped {len(self.skipped):,}"

    def reasons_line(self) -> str:
        """How many files were skipped for what, most common first: "2 not an image, 1 ..."."""
        return ", ".join(f"{n:,} {reason}" for reason, n in self.reasons.most_common())


def get_bottlenecks(paths: Sequence[Path], base: BaseModel, cache: BottleneckCache | None, *,
                    batch_size: int = 32, workers: int | None = None,
                    max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = True,
                    rules: FileRules | None = None) -> tuple[dict[Path, np.ndarray], BottleneckReport]:
    """Bottleneck vectors for ``paths``; files that are not usable images are reported, not fatal.

    ``rules`` say how files may be read (image_files.FileRules; by default no confinement to a
    folder, the default size cap).
    """
    rules = rules or FileRules()
    report = BottleneckReport()
    # The forward pass already keeps every core busy; more decode threads only contend with it.
    workers = workers or max(2, os.cpu_count() or 2)
    vectors: dict[Path, np.ndarray] = {}
    keys = report.keys
    with ThreadPoolExecutor(workers) as pool:
        for path, key in zip(paths, pool.map(lambda p: _safe_key(p, rules), paths), strict=False):
            if isinstance(key, BadImageError):
                report.skip(key)
            else:
                keys[path] = key
        todo = []
        for path, key in keys.items():
            cached = cache.get(key) if cache else None
            if cached is None:
                todo.append(path)
            else:
                vectors[path] = cached
                report.reused += 1
        for path in todo:
            del keys[path]  # set again from the bytes that are decoded
        if todo:
            features = pixels_feature_function(base)
            bar = tqdm(total=len(todo), desc="Bottlenecks", unit="img", disable=not progress, leave=False)
            for attempted, batch, arrays in _decoded_batches(todo, pool, batch_size, max_pixels, report,
                                                              base.input_size, rules):
                out = features(*pack_images(arrays)) if arrays else []
                for (path, key), vector in zip(batch, out, strict=False):
                    vectors[path] = vector
                    keys[path] = key
                    if cache:
                        cache.put(key, vector)
                report.computed += len(batch)
                bar.update(attempted)
            bar.close()
    return vectors, report


def _safe_key(path: Path, rules: FileRules) -> str | BadImageError:
    try:
        return content_key(path, rules)
    except BadImageError as e:
        return e


def _decode_one(path: Path, max_pixels: int, size: Sequence[int], rules: FileRules
                ) -> tuple[str, np.ndarray] | BadImageError:
    """(hash of the bytes decoded, pixels): one read serves both."""
    try:
        key, data = read_image_bytes(path, rules)
        return key, decode_image(data, max_pixels=max_pixels, name=str(path), size=size)
    except BadImageError as e:
        return e


def _decoded_batches(paths: list[Path], pool: ThreadPoolExecutor, batch_size: int, max_pixels: int,
                     report: BottleneckReport, size: Sequence[int], rules: FileRules
                     ) -> Iterable[tuple[int, list[tuple[Path, str]], list[np.ndarray]]]:
    """Yield decoded batches, (path, key) and pixels of each usable image, while the pool already
    decodes the next ones."""
    chunks = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    pending: deque = deque()
    ahead = 2  # batches decoded ahead of the forward pass; bounds memory
    for i, chunk in enumerate(chunks):
        while len(pending) <= ahead and i + len(pending) < len(chunks):
            nxt = chunks[i + len(pending)]
            pending.append((nxt, [pool.submit(_decode_one, p, max_pixels, size, rules) for p in nxt]))
        chunk, futures = pending.popleft()
        good, arrays = [], []
        for path, future in zip(chunk, futures, strict=False):
            result = future.result()
            if isinstance(result, BadImageError):
                report.skip(result)
            else:
                good.append((path, result[0]))
                arrays.append(result[1])
        yield len(chunk), good, arrays
