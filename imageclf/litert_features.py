"""A base model's forward pass through LiteRT: bottleneck vectors about twice as fast as TensorFlow's.

Retrain's bottleneck step spends most of its time in the base's forward pass
(benchmarks/bench_retrain.py). The base is already a frozen graph (bases.BaseModel), so it is
converted as it is, in this process (TensorFlow is loaded for training anyway), once per base
and process. The vectors match TensorFlow's within about 1e-5 of their scale; the cache keeps them
apart all the same (bottlenecks.cache_key names the runtime).
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

import numpy as np

from imageclf.bases import BaseModel
from imageclf.cli_common import stderr_silenced


class LiteFeaturesUnavailable(Exception):
    """LiteRT cannot run this base here; ``str(e)`` says why."""


class LiteFeatures:
    """float32 ``[n, H, W, 3]`` in [0, 1] -> ``[n, D]``, one call at a time (an interpreter is not thread-safe)."""

    def __init__(self, base: BaseModel, threads: int | None = None):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise LiteFeaturesUnavailable("ai-edge-litert is not installed") from None
        from imageclf.litert_model import ResizingInterpreter

        model = _converted(base)
        with stderr_silenced():  # "Created TensorFlow Lite XNNPACK delegate", when the tensors are allocated
            self._interpreter = ResizingInterpreter(
                Interpreter(model_content=model, num_threads=threads or len(os.sched_getaffinity(0))))
        self._lock = threading.Lock()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        with self._lock:
            return self._interpreter.invoke(np.ascontiguousarray(images, dtype=np.float32))


def _converted(base: BaseModel) -> bytes:
    import tensorflow as tf

    inputs, outputs = [base.input_name.split(":")[0]], [base.output_name.split(":")[0]]
    with tempfile.TemporaryDirectory() as folder:
        frozen = Path(folder) / "base.pb"
        frozen.write_bytes(base.graph_def.SerializeToString())
        try:
            return tf.compat.v1.lite.TFLiteConverter.from_frozen_graph(
                str(frozen), inputs, outputs, {inputs[0]: [None, *base.input_size, 3]}).convert()
        except Exception as e:  # the converter raises many kinds; the first line names the op
            text = str(e).strip()
            raise LiteFeaturesUnavailable(text.splitlines()[0] if text else type(e).__name__) from None
