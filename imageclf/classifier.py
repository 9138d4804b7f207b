"""What every loaded classifier offers, whichever runtime runs it, and where its settings come from.

A classifier (graph_model.GraphModel in a TensorFlow session, litert_model.LiteModel in a
LiteRT interpreter) has labels, an input size and a pixel scaling, and runs a batch of model
inputs; turning pixels into model input and reading the top scores are the same for all, here.
Nothing here needs TensorFlow.

Our own graphs describe themselves (labels and metadata are constants inside), and files beside
them are not read. Graphs from the older retrain scripts need their input tensor, size and
mean/std: from arguments, or from a ``<graph stem>.json`` file beside the graph, e.g.::

    {"input_tensor": "input:0", "output_tensor": "final_result:0", "input_size": [128, 128],
     "input_mean": 127.5, "input_std": 127.5, "labels_file": "retrained_labels.txt"}
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from imageclf.errors import UserError
from imageclf.preprocess import image_to_model_input

_SETTINGS = ("input_tensor", "output_tensor", "input_size", "input_mean", "input_std", "labels_file")


@dataclass(frozen=True)
class GraphSettings:
    """How to feed a graph and read its answer. ``None`` means: find out from the graph."""

    input_tensor: str | None = None
    output_tensor: str | None = None
    input_size: tuple[int, int] | None = None
    input_mean: float | None = None
    input_std: float | None = None
    labels_file: str | None = None

    def merged(self, fallback: GraphSettings) -> GraphSettings:
        return GraphSettings(**{k: getattr(self, k) if getattr(self, k) is not None else getattr(fallback, k)
                                for k in _SETTINGS})

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> GraphSettings:
        values = json.loads(text)
        if values.get("input_size") is not None:
            values["input_size"] = tuple(values["input_size"])
        return cls(**{k: values.get(k) for k in _SETTINGS})


def sidecar_path(graph_path: Path) -> Path:
    return graph_path.with_suffix(".json")


def read_sidecar(graph_path: Path) -> GraphSettings:
    """The settings in ``<graph stem>.json`` beside a graph, or none."""
    path = sidecar_path(graph_path)
    if not path.is_file():
        return GraphSettings()
    try:
        return GraphSettings.from_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{path}: cannot read settings: {e}") from None


def graph_version(metadata: dict | None, modified_ns: int) -> int:
    """A graph's version: the one retrain.py writes into its metadata, else its file's mtime in seconds
    (graphs from other tools); the service and label_image.py's --json report the same number."""
    return int((metadata or {}).get("version") or modified_ns // 10**9)


class Classifier:
    """The part of a loaded model that does not depend on its runtime.

    Subclasses set ``path``, ``labels``, ``input_size``, ``input_mean``, ``input_std``,
    ``metadata``, ``input_name``, ``output_name``, ``bytes_input_name`` and ``batchable``, and
    implement ``run`` and ``close``. ``run`` is safe to call from several threads at once.
    """

    runtime = ""                       # "tf" or "litert": what runs the model
    runtime_note: str | None = None    # why a model runs on another runtime than the one asked for
    path: Path
    labels: list[str]
    input_size: tuple[int, int]
    input_mean: float
    input_std: float
    metadata: dict | None
    input_name: str
    output_name: str
    bytes_input_name: str | None = None
    batchable: bool
    concurrency: int | None = None     # model calls that can run at once; None: any number (a TF session)

    @property
    def name(self) -> str:
        return (self.metadata or {}).get("name") or self.path.stem

    @property
    def version(self) -> int:
        """The version the service reports for this graph (see graph_version)."""
        return graph_version(self.metadata, self.path.stat().st_mtime_ns)

    def model_input(self, pixels: np.ndarray) -> np.ndarray:
        """Decoded RGB uint8 ``[h, w, 3]`` -> what this model's input takes for it."""
        x = image_to_model_input(pixels, self.input_size)
        if (self.input_mean, self.input_std) == (0.0, 255.0):
            return x
        return (x * 255.0 - self.input_mean) / self.input_std

    def predict(self, pixels: Sequence[np.ndarray]) -> np.ndarray:
        """Probabilities ``[n, classes]`` for decoded images (see images.decode_image)."""
        return self.run(np.stack([self.model_input(p) for p in pixels]))

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities for a batch of model inputs (see model_input)."""
        raise NotImplementedError

    def top_k(self, probabilities: np.ndarray, k: int = 5) -> list[tuple[str, float]]:
        order = np.argsort(-probabilities, kind="stable")[:k]
        return [(self.labels[i], float(probabilities[i])) for i in order]

    def close(self) -> None:
        raise NotImplementedError


def read_labels_file(labels_file: str, graph_path: Path) -> list[str]:
    """Labels, one per line; a relative path that does not exist is looked up beside the graph."""
    path = Path(labels_file)
    if not path.is_absolute() and not path.exists():
        path = graph_path.parent / path
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as e:
        raise UserError(f"--labels {labels_file}: {e.strerror}") from None
