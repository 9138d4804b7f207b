"""Loading a frozen classifier graph and running it in a ``tf.compat.v1`` session.

Settings (GraphSettings, the ``.json`` beside a graph) are described in classifier.py.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf
from google.protobuf.message import DecodeError

from imageclf.classifier import Classifier, GraphSettings, read_labels_file, read_sidecar
from imageclf.errors import UserError

log = logging.getLogger(__name__)


class GraphModel(Classifier):
    """A loaded classifier: one Graph and one Session, safe to share between threads.

    ``decode_in_graph=False`` is for callers that always feed decoded pixels (the service): the
    graph's own decoder, the part below a ``Placeholder`` that defaults to ``image_bytes:0``, is
    left out of the session. Its functions (EXIF parsing, per-image loops) cost TensorFlow's graph
    optimizer about half a second at every load even though a fed input never runs them.
    ``bytes_input`` is then None; ``bytes_input_name`` still names the graph's encoded input.
    A graph that cannot be cut that way is loaded whole.
    """

    runtime = "tf"

    def __init__(self, path: str | Path, settings: GraphSettings | None = None, *, decode_in_graph: bool = True):
        self.path = Path(path)
        graph_def = _read_graph_def(self.path)
        self.graph = _imported(graph_def)
        metadata = self._embedded("metadata:0")
        self.metadata = json.loads(metadata.item()) if metadata is not None else None
        # A graph that describes itself (ours) takes nothing from the files beside it: retrain
        # replaces those after the graph, so they may still be the previous graph's.
        beside = read_sidecar(self.path) if self.metadata is None else GraphSettings()
        resolved = (settings or GraphSettings()).merged(self._described()).merged(beside)
        self.input = self._tensor(_with_port(resolved.input_tensor or self._default_input()), "input")
        self.output = self._tensor(_with_port(resolved.output_tensor or "final_result"), "output")
        self.input_size = self._input_size(resolved.input_size)
        if resolved.input_mean is None or resolved.input_std is None:
            raise UserError(f"{self.path.name}: cannot tell how this graph expects pixels to be scaled; "
                            "give --input_mean and --input_std (pixels are fed as (p - mean) / std, "
                            "e.g. 127.5 and 127.5 for MobileNet graphs from the Poets retrain.py)")
        self.input_mean, self.input_std = float(resolved.input_mean), float(resolved.input_std)
        self.labels = self._labels(resolved.labels_file)
        self.bytes_input = self._optional_tensor("image_bytes:0") if self.metadata else None
        self.bytes_input_name = self.bytes_input.name if self.bytes_input is not None else None
        if not decode_in_graph and self.input.op.type == "PlaceholderWithDefault":
            self._leave_out_the_decoder(graph_def)
        self.batchable = self.input.shape.rank is None or self.input.shape[0] != 1
        self.session = tf.compat.v1.Session(graph=self.graph)

    def _leave_out_the_decoder(self, graph_def: tf.compat.v1.GraphDef) -> None:
        try:
            graph = _imported(_fed_subgraph(graph_def, self.input.op.name, [self.output.op.name]))
        except (KeyError, ValueError, tf.errors.OpError) as e:
            # An unusual graph that cannot be cut cleanly is served whole: slower to load, same answers.
            log.info("%s: serving the whole graph (its decoder could not be left out: %s)", self.path.name, e)
            return
        self.graph = graph
        self.input, self.output = self._tensor(self.input.name, "input"), self._tensor(self.output.name, "output")
        self.bytes_input = None

    @property
    def input_name(self) -> str:
        return self.input.name

    @property
    def output_name(self) -> str:
        return self.output.name

    def run(self, batch: np.ndarray) -> np.ndarray:
        if self.batchable:
            return self.session.run(self.output, {self.input: batch})
        return np.concatenate([self.session.run(self.output, {self.input: one[None]}) for one in batch])

    def predict_encoded(self, encoded: Sequence[bytes]) -> np.ndarray:
        """Probabilities for encoded images, decoded inside the graph (``image_bytes:0``)."""
        if self.bytes_input is None:
            raise UserError(f"{self.path.name} has no image_bytes input")
        return self.session.run(self.output, {self.bytes_input: list(encoded)})

    def close(self) -> None:
        self.session.close()

    # -- resolving settings -------------------------------------------------------------

    def _embedded(self, name: str):
        tensor = self._optional_tensor(name)
        if tensor is None or tensor.op.type != "Const":
            return None
        return tf.make_ndarray(tensor.op.get_attr("value"))

    def _described(self) -> GraphSettings:
        meta = self.metadata or {}
        return GraphSettings(input_tensor=meta.get("input_tensor"), output_tensor=meta.get("output_tensor"),
                             input_size=tuple(meta["input_size"]) if "input_size" in meta else None,
                             input_mean=meta.get("input_mean"), input_std=meta.get("input_std"))

    def _default_input(self) -> str:
        placeholders = [op.name for op in self.graph.get_operations() if op.type == "Placeholder"]
        if "input" in placeholders or len(placeholders) != 1:
            return "input"
        return placeholders[0]

    def _tensor(self, name: str, role: str) -> tf.Tensor:
        tensor = self._optional_tensor(name)
        if tensor is None:
            raise UserError(f"{self.path.name}: no {role} tensor named '{name}' in this graph")
        return tensor

    def _optional_tensor(self, name: str) -> tf.Tensor | None:
        try:
            return self.graph.get_tensor_by_name(name)
        except (KeyError, ValueError):
            return None

    def _input_size(self, given) -> tuple[int, int]:
        shape = self.input.shape
        declared = tuple(shape[1:3]) if shape.rank == 4 and None not in shape[1:3] else None
        if given is not None:
            if declared and tuple(int(v) for v in given) != declared:
                raise UserError(f"{self.path.name}: input is {declared[0]}x{declared[1]}, "
                                f"not {given[0]}x{given[1]}")
            return int(given[0]), int(given[1])
        if declared is None:
            raise UserError(f"{self.path.name}: the input size is not fixed in the graph; "
                            "give --input_height and --input_width")
        return int(declared[0]), int(declared[1])

    def _labels(self, labels_file: str | None) -> list[str]:
        if labels_file is None:
            embedded = self._embedded("labels:0")
            if embedded is None:
                raise UserError(f"{self.path.name} has no embedded labels; give --labels FILE")
            labels = [v.decode("utf-8") for v in embedded]
        else:
            labels = read_labels_file(labels_file, self.path)
        width = self.output.shape[-1] if self.output.shape.rank else None
        if width is not None and width != len(labels):
            raise UserError(f"{self.path.name}: the graph outputs {width} scores but there are {len(labels)} labels")
        return labels


def _read_graph_def(path: Path) -> tf.compat.v1.GraphDef:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"--graph {path}: {e.strerror}") from None
    graph_def = tf.compat.v1.GraphDef()
    try:
        graph_def.ParseFromString(data)
    except DecodeError:
        raise UserError(f"--graph {path}: not a frozen TensorFlow GraphDef (.pb)") from None
    if not graph_def.node:
        raise UserError(f"--graph {path}: not a frozen TensorFlow GraphDef (it has no nodes)")
    return graph_def


def _imported(graph_def: tf.compat.v1.GraphDef) -> tf.Graph:
    graph = tf.Graph()
    with graph.as_default():
        tf.import_graph_def(graph_def, name="")
    return graph


def _fed_subgraph(graph_def: tf.compat.v1.GraphDef, fed: str, fetches: list[str]) -> tf.compat.v1.GraphDef:
    """What ``fetches`` need when the PlaceholderWithDefault ``fed`` is always fed: ``fed`` becomes
    a plain Placeholder, and the nodes and library functions only its default needed are dropped."""
    nodes = {node.name: node for node in graph_def.node}
    placeholder = tf.compat.v1.NodeDef(name=fed, op="Placeholder")
    for key in ("dtype", "shape"):
        placeholder.attr[key].CopyFrom(nodes[fed].attr[key])
    nodes[fed] = placeholder
    kept, todo = [], list(fetches)
    seen = set(todo)
    while todo:
        node = nodes[todo.pop()]
        kept.append(node)
        for name in node.input:
            name = name.lstrip("^").split(":")[0]
            if name not in seen:
                seen.add(name)
                todo.append(name)
    functions = {f.signature.name: f for f in graph_def.library.function}
    used, todo = set(), [name for node in kept for name in _called_functions(node)]
    while todo:
        name = todo.pop()
        if name in functions and name not in used:
            used.add(name)
            todo.extend(called for node in functions[name].node_def for called in _called_functions(node))
    sub = tf.compat.v1.GraphDef()
    sub.versions.CopyFrom(graph_def.versions)
    sub.node.extend(node for node in graph_def.node if node.name in seen and node.name != fed)
    sub.node.append(placeholder)
    sub.library.function.extend(functions[name] for name in sorted(used))  # no gradients: nothing trains here
    for node in sub.node:
        _drop_colocation_with_dropped(node, seen)
    return sub


def _called_functions(node) -> list[str]:
    """Functions a node calls: as its op (a function call) or through function-valued attributes."""
    names, values = [node.op], list(node.attr.values())
    while values:
        value = values.pop()
        functions = ([value.func] if value.HasField("func") else []) + list(value.list.func)
        names.extend(f.name for f in functions)
        values.extend(v for f in functions for v in f.attr.values())  # a function's own attributes
    return names


def _drop_colocation_with_dropped(node, kept: set[str]) -> None:
    """Import refuses a node pinned next to a node that is not in the graph: such hints go."""
    if "_class" not in node.attr:
        return
    hints = [h for h in node.attr["_class"].list.s if not h.startswith(b"loc:@") or h[5:].decode() in kept]
    if hints:
        del node.attr["_class"].list.s[:]
        node.attr["_class"].list.s.extend(hints)
    else:
        del node.attr["_class"]


def _with_port(name: str) -> str:
    return name if ":" in name else f"{name}:0"
