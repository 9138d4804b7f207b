"""A frozen graph -> a LiteRT (``.tflite``) model: the one step of the LiteRT runtime that needs TensorFlow.

litert_model runs it as ``python -m imageclf.litert_convert`` in a child process, so a service
that serves LiteRT models never loads TensorFlow (about 500 MiB) itself. What is converted is
what the service feeds: model input (``Placeholder:0``, float32 pixels) to scores
(``final_result:0``); a graph's own decoder (``image_bytes``) is left out. Beside the model, a
JSON file keeps what the graph said about itself (labels, input size and scaling, metadata),
since a LiteRT model cannot be asked that without TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from imageclf.atomic import write_bytes_atomic, write_text_atomic
from imageclf.classifier import GraphSettings
from imageclf.errors import UserError

FORMAT = "imageclf-litert/1"


def convert(graph_path: str | Path, settings: GraphSettings | None = None) -> tuple[bytes, dict]:
    """The ``.tflite`` bytes of a graph and what the graph says about itself."""
    import tensorflow as tf

    from imageclf.graph_model import GraphModel

    model = GraphModel(graph_path, settings, decode_in_graph=False)
    try:
        inputs, outputs = [model.input.op.name], [model.output.op.name]
        shape = [None if model.batchable else 1, *model.input_size, 3]
        with tempfile.TemporaryDirectory() as folder:
            frozen = Path(folder) / "fed.pb"
            frozen.write_bytes(model.graph.as_graph_def().SerializeToString())
            try:
                data = tf.compat.v1.lite.TFLiteConverter.from_frozen_graph(
                    str(frozen), inputs, outputs, {inputs[0]: shape}).convert()
            except Exception as e:  # the converter raises many kinds; its first line says which op
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UserError(f"{Path(graph_path).name}: TensorFlow cannot convert it to LiteRT: {first}") from None
        info = {"format": FORMAT, "name": model.name, "labels": model.labels,
                "input_size": list(model.input_size), "input_mean": model.input_mean,
                "input_std": model.input_std, "metadata": model.metadata, "batchable": model.batchable,
                "input_name": model.input_name, "output_name": model.output_name,
                "bytes_input_name": model.bytes_input_name, "converter": f"tensorflow {tf.__version__}"}
        return data, info
    finally:
        model.close()


def write_converted(graph_path: str | Path, out: str | Path, settings: GraphSettings | None = None) -> None:
    """``out`` (.tflite) and its ``.json``, each atomic; the JSON last, since a reader takes it as the sign
    that the pair is whole."""
    data, info = convert(graph_path, settings)
    out = Path(out)
    write_bytes_atomic(out, data, durable=False)
    write_text_atomic(out.with_suffix(".json"), json.dumps(info))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imageclf.litert_convert",
                                     description="Convert a frozen classifier graph to a LiteRT model "
                                                 "(OUT.tflite and OUT.json).")
    parser.add_argument("graph", help="frozen graph (.pb)")
    parser.add_argument("out", help="the .tflite file to write; its .json is written beside it")
    parser.add_argument("--settings", default="{}", help="GraphSettings as JSON, for graphs of the older scripts")
    args = parser.parse_args(argv)
    write_converted(args.graph, args.out, GraphSettings.from_json(args.settings))
    return 0


if __name__ == "__main__":
    from imageclf.cli_common import quiet_tensorflow, run

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    quiet_tensorflow()
    raise SystemExit(run("litert_convert", main))
