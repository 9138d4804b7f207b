"""GraphModel(decode_in_graph=False) on graphs shaped like ours but with the oddities other tools write.

A small hand-built graph: an ``image_bytes`` input decoded by a library function, a
``Placeholder`` that defaults to the decoded pixels, and a softmax on top. The service's load
must leave the decoder out (no library function left) and answer as the whole graph does.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from imageclf.graph_model import GraphModel

SIZE = 4


def _graph_def() -> tf.compat.v1.GraphDef:
    graph = tf.Graph()
    with graph.as_default():
        encoded = tf.compat.v1.placeholder_with_default(tf.constant([b"x"]), [None], name="image_bytes")

        @tf.function
        def decode(strings):  # stands in for the real decoder: a call into the function library
            n = tf.shape(strings)[0]
            return tf.fill([n, SIZE, SIZE, 3], tf.cast(tf.strings.length(strings[0]), tf.float32) / 10)

        pixels = tf.compat.v1.placeholder_with_default(decode(encoded), [None, SIZE, SIZE, 3], name="Placeholder")
        @tf.function
        def head(x):  # a library function the answer needs: it must stay
            return tf.matmul(tf.reduce_mean(x, [1, 2]), tf.constant(np.arange(6, dtype=np.float32).reshape(3, 2) / 3))

        tf.nn.softmax(head(pixels), name="final_result")
        tf.constant(["cat", "dog"], name="labels")
        tf.constant(json.dumps({"input_tensor": "Placeholder:0", "input_size": [SIZE, SIZE], "input_mean": 0.0,
                                "input_std": 255.0}), name="metadata")
    return graph.as_graph_def()


def _call(graph_def: tf.compat.v1.GraphDef, function: str) -> tf.compat.v1.NodeDef:
    return next(n for n in graph_def.node if n.op in ("StatefulPartitionedCall", "PartitionedCall")
                and n.attr["f"].func.name.startswith(f"__inference_{function}_"))


def _with(graph_def, oddity: str) -> tf.compat.v1.GraphDef:
    if oddity == "colocated with the decoder":
        node = next(n for n in graph_def.node if n.name == "final_result")
        node.attr["_class"].list.s.append(f"loc:@{_call(graph_def, 'decode').name}".encode())
    elif oddity == "a gradient function":  # for the head; itself used by nothing the answer needs
        gradient = graph_def.library.function.add()
        gradient.CopyFrom(_function(graph_def, "decode"))
        gradient.signature.name = "head_gradient"
        graph_def.library.gradient.add(function_name=_call(graph_def, "head").attr["f"].func.name,
                                       gradient_func="head_gradient")
    return graph_def


def _function(graph_def: tf.compat.v1.GraphDef, function: str):
    name = _call(graph_def, function).attr["f"].func.name
    return next(f for f in graph_def.library.function if f.signature.name == name)


@pytest.mark.parametrize("oddity", ["none", "colocated with the decoder", "a gradient function"])
def test_the_decoder_is_left_out_and_the_answers_stay(oddity, tmp_path):
    path = tmp_path / "odd.pb"
    path.write_bytes(_with(_graph_def(), oddity).SerializeToString())
    whole, served = GraphModel(path), GraphModel(path, decode_in_graph=False)
    try:
        head = _function(whole.graph.as_graph_def(), "head").signature.name
        assert len(whole.graph.as_graph_def().library.function) >= 2  # the decoder is there to leave out
        cut = served.graph.as_graph_def()
        assert [f.signature.name for f in cut.library.function] == [head] and not cut.library.gradient
        assert served.input.op.type == "Placeholder" and served.bytes_input is None
        assert served.bytes_input_name == whole.bytes_input_name == "image_bytes:0"
        pixels = [np.random.default_rng(i).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for i in range(3)]
        np.testing.assert_allclose(served.predict(pixels), whole.predict(pixels), rtol=0, atol=1e-6)
    finally:
        whole.close()
        served.close()

