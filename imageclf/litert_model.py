"""Running a frozen graph with LiteRT (XNNPACK): the same answers as a TensorFlow session, faster and smaller.

The graph is converted once (litert_convert, in a child process unless TensorFlow is loaded
here anyway, so a LiteRT service never loads it) and the result cached by the content of
everything that decides it: the graph's bytes, its settings and the files they name. A LiteRT
interpreter is not thread-safe, so a model keeps a small pool of them; a call takes one,
resizes its input to the batch when the batch size changed (cheap: XNNPACK keeps its packed
weights), runs it and gives it back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imageclf.atomic import write_text_atomic
from imageclf.classifier import Classifier, GraphSettings, read_sidecar, sidecar_path
from imageclf.cli_common import stderr_silenced
from imageclf.install import child_env
from imageclf.litert_convert import FORMAT

log = logging.getLogger(__name__)

CACHE_ENV = "IMAGECLF_LITERT_CACHE_DIR"
MAX_CACHE_ENTRIES = 32          # converted models kept; the least recently used go first
CONVERT_TIMEOUT_S = 600.0       # TensorFlow's import and the conversion of a big graph on a slow machine


class LiteRTUnavailable(Exception):
    """This graph cannot run on LiteRT here; ``str(e)`` says why (callers fall back to TensorFlow).

    ``final``: the converter refused these bytes, and would again (remembered in the cache).
    """

    final = False


@dataclass(frozen=True)
class LiteOptions:
    threads: int = 1            # threads of one interpreter (one invoke)
    interpreters: int = 1       # invokes that may run at once
    cache_dir: str | None = None


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "imageclf" / "litert"


class LiteModel(Classifier):
    """A classifier run by LiteRT interpreters; the same surface as graph_model.GraphModel."""

    runtime = "litert"

    def __init__(self, path: str | Path, settings: GraphSettings | None = None, options: LiteOptions | None = None):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise LiteRTUnavailable("ai-edge-litert is not installed (pip install ai-edge-litert)") from None
        options = options or LiteOptions()
        self.path = Path(path)
        model_file, info = converted(self.path, settings or GraphSettings(), options.cache_dir)
        self.labels = list(info["labels"])
        self.input_size = (int(info["input_size"][0]), int(info["input_size"][1]))
        self.input_mean, self.input_std = float(info["input_mean"]), float(info["input_std"])
        self.metadata = info["metadata"]
        self.input_name, self.output_name = info["input_name"], info["output_name"]
        self.bytes_input_name = info["bytes_input_name"]
        self.batchable = bool(info["batchable"])
        content = model_file.read_bytes()
        self.concurrency = max(1, options.interpreters)
        self._pool: queue.SimpleQueue[ResizingInterpreter] = queue.SimpleQueue()
        threads = max(1, options.threads)
        for _ in range(max(1, options.interpreters)):
            with stderr_silenced():  # one "Created TensorFlow Lite XNNPACK delegate" line per interpreter
                self._pool.put(ResizingInterpreter(Interpreter(model_content=content, num_threads=threads)))

    def run(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        slot = self._pool.get()
        try:
            if self.batchable:
                return slot.invoke(batch)
            return np.concatenate([slot.invoke(batch[i:i + 1]) for i in range(len(batch))])
        finally:
            self._pool.put(slot)

    def close(self) -> None:
        # Interpreters free their memory when the last reference goes; the Servable drops the model.
        while True:
            try:
                self._pool.get_nowait()
            except queue.Empty:
                return


class ResizingInterpreter:
    """One interpreter and the batch size its tensors are allocated for; not thread-safe (callers hold it alone)."""

    def __init__(self, interpreter) -> None:
        self.interpreter = interpreter
        interpreter.allocate_tensors()
        self.input = interpreter.get_input_details()[0]["index"]
        self.output = interpreter.get_output_details()[0]["index"]
        self.shape = tuple(interpreter.get_input_details()[0]["shape"])

    def invoke(self, batch: np.ndarray) -> np.ndarray:
        if batch.shape != self.shape:
            self.interpreter.resize_tensor_input(self.input, batch.shape, strict=True)
            self.interpreter.allocate_tensors()
            self.shape = batch.shape
        self.interpreter.set_tensor(self.input, batch)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output).copy()  # the interpreter reuses its buffer


# -- the conversion cache -------------------------------------------------------------------------


def converted(graph_path: Path, settings: GraphSettings, cache_dir: str | None = None) -> tuple[Path, dict]:
    """The cached ``.tflite`` of a graph and its description, converting it first if needed."""
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    try:
        key = cache_key(graph_path, settings)
    except OSError as e:
        raise LiteRTUnavailable(f"cannot read {graph_path}: {e.strerror}") from None
    model_file = folder / f"{key}.tflite"
    refused = model_file.with_suffix(".refused")
    if refused.is_file():  # the same bytes were refused before: no child process at every reload
        raise LiteRTUnavailable(refused.read_text(encoding="utf-8", errors="replace").strip())
    info = _cached_info(model_file)
    if info is None:
        try:
            _convert(graph_path, settings, model_file)
        except LiteRTUnavailable as e:
            if e.final:
                with contextlib.suppress(OSError):
                    write_text_atomic(refused, str(e))
            raise
        info = _cached_info(model_file)
        if info is None:
            raise LiteRTUnavailable(f"the converter wrote no usable {model_file}")
        _evict(folder, keep=model_file)
    else:
        with contextlib.suppress(OSError):  # a read-only cache is still a cache
            os.utime(model_file.with_suffix(".json"))  # recently used: evicted last
    return model_file, info


def cache_key(graph_path: Path, settings: GraphSettings) -> str:
    """A digest of everything the converted model depends on."""
    digest = hashlib.sha256(f"{FORMAT}\n{settings.to_json()}\n".encode())
    digest.update(graph_path.read_bytes())
    beside = sidecar_path(graph_path)
    if beside.is_file():
        digest.update(b"\nsidecar\n" + beside.read_bytes())
    labels_file = settings.labels_file or read_sidecar(graph_path).labels_file
    if labels_file:
        for candidate in (Path(labels_file), graph_path.parent / labels_file):
            if candidate.is_file():
                digest.update(b"\nlabels\n" + candidate.read_bytes())
                break
    return digest.hexdigest()[:40]


def _cached_info(model_file: Path) -> dict | None:
    try:
        info = json.loads(model_file.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("format") != FORMAT or not model_file.is_file():
        return None
    return info


def _convert(graph_path: Path, settings: GraphSettings, model_file: Path) -> None:
    """In this process if it has loaded TensorFlow anyway (retrain, tests), else in a child that frees it all."""
    if "tensorflow" not in sys.modules:
        _convert_in_child(graph_path, settings, model_file)
        return
    from imageclf.errors import UserError
    from imageclf.litert_convert import write_converted

    try:
        write_converted(graph_path, model_file, settings)
    except UserError as e:
        error = LiteRTUnavailable(str(e))
        error.final = True
        raise error from None
    except OSError as e:
        raise LiteRTUnavailable(f"cannot write {model_file}: {e.strerror or e}") from None


def _convert_in_child(graph_path: Path, settings: GraphSettings, model_file: Path) -> None:
    env = dict(child_env(), TF_CPP_MIN_LOG_LEVEL="3")  # imports this imageclf, installed or from a clone
    command = [sys.executable, "-m", "imageclf.litert_convert", str(graph_path), str(model_file),
               "--settings", settings.to_json()]
    log.info("%s: converting to LiteRT (once; cached in %s)", graph_path.name, model_file.parent)
    try:
        model_file.parent.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=CONVERT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise LiteRTUnavailable(f"converting {graph_path.name} took over {CONVERT_TIMEOUT_S:.0f} s") from None
    except OSError as e:
        raise LiteRTUnavailable(f"cannot convert {graph_path.name}: {e.strerror or e}") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        reason = lines[-1] if lines else f"the converter exited with code {done.returncode}"
        error = LiteRTUnavailable(reason.removeprefix("litert_convert: error: "))
        error.final = done.returncode == 2  # a refusal (UserError), not a crash or a missing package
        raise error


def _evict(folder: Path, keep: Path) -> None:
    """Keep the MAX_CACHE_ENTRIES most recently used models (retrains add one each)."""
    entries = sorted(folder.glob("*.json"), key=_mtime, reverse=True)
    for info in entries[MAX_CACHE_ENTRIES:]:
        if info.with_suffix(".tflite") != keep:
            info.with_suffix(".tflite").unlink(missing_ok=True)
            info.unlink(missing_ok=True)
    for refused in sorted(folder.glob("*.refused"), key=_mtime, reverse=True)[MAX_CACHE_ENTRIES:]:
        refused.unlink(missing_ok=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # another process evicted it meanwhile
        return 0.0
