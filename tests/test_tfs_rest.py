"""TensorFlow Serving's REST API, held to what TF Serving answers for our exported SavedModel.

Golden answers come from two places: the request and response shapes of TF Serving's REST API
documentation (api_rest.md and the JSON its handler tests expect), written out here; and the
SavedModel that ``retrain.py --saved_model_dir`` exports, whose own SignatureDefs (loaded with
TensorFlow, turned into proto3 JSON with ``json_format.MessageToDict`` as TF Serving prints them)
the service's metadata must equal. The service runs for real on 127.0.0.1 over a real retrained
graph (a tiny base, so it stays fast). Also here: ``?format=lists`` on path and upload answers.
"""

from __future__ import annotations

import base64
import json

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf.json_format import MessageToDict
from tensorflow_serving.apis import get_model_metadata_pb2, prediction_service_pb2_grpc

from imageclf.graph_model import GraphModel
from imageclf.images import decode_image
from imageclf.preprocess import image_to_model_input
from imageclf.retrain import retrain
from imageclf.training import TrainConfig
from service.grpc_api import GrpcServer
from tests.demo_data import make_dataset

from .conftest import quick_options
from .service_helpers import Server, multipart

MODEL = "shapes"
LABELS = ["circle", "square", "triangle"]
SIZE = (32, 32)  # the tiny base's input
JSON = {"Content-Type": "application/json"}


def proto_json(message) -> dict:
    """A proto as TF Serving's REST API prints it: proto field names, every field (always_print_primitive_fields)."""
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


@pytest.fixture(scope="module")
def model(tiny_module, tmp_path_factory):
    """A retrained graph in ``graphs/`` and its SavedModel export, and the pictures it was trained on."""
    out = tmp_path_factory.mktemp("tfs_rest")
    make_dataset(out / "images", per_class=6)
    opts = quick_options(out / "images", out, tfhub_module=str(tiny_module), saved_model_dir=str(out / "saved"),
                         training=TrainConfig(steps=60, eval_step_interval=60, progress=False))
    opts.output_graph = str(out / "graphs" / f"{MODEL}.pb")
    return retrain(opts, log=lambda line: None), out / "images"


@pytest.fixture(scope="module")
def server(model):
    result, images = model
    server = Server(result.graph.parent, images, max_instances=4, batch_size=2)
    yield server
    server.close()


@pytest.fixture(scope="module")
def version(model) -> int:
    """The model's version: the SavedModel folder's number, which the graph's metadata carries too."""
    return int(model[0].saved_model.name)


@pytest.fixture(scope="module")
def pictures(model) -> list[bytes]:
    images = model[1]
    return [(images / "circle" / "circle_001.jpg").read_bytes(),
            (images / "triangle" / "triangle_002.jpg").read_bytes()]


@pytest.fixture(scope="module")
def expected(model, pictures) -> np.ndarray:
    """The scores of ``pictures`` from the graph itself (decoded in the graph, as TF Serving would)."""
    graph = GraphModel(model[0].graph)
    try:
        return graph.predict_encoded(pictures)
    finally:
        graph.close()


def b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode()}


def post(server: Server, path: str, body) -> tuple[int, object]:
    return server.json(path, data=json.dumps(body).encode(), headers=JSON)


def error_of(server: Server, path: str, body=None) -> tuple[int, str]:
    """Status and message of a failing call; the body must be TF Serving's error shape and nothing else."""
    status, answer = server.json(path) if body is None else post(server, path, body)
    assert status >= 400 and set(answer) == {"error"} and isinstance(answer["error"], str), answer
    return status, answer["error"]


# -- Metadata: the exported SavedModel's own SignatureDefs ------------------------------------------------


def saved_model_metadata(saved_model, version: int) -> dict:
    """What TF Serving's GET /v1/models/shapes/metadata answers for the export: its SignatureDefs, read with TF."""
    graph = tf.Graph()
    with tf.compat.v1.Session(graph=graph) as session:
        meta_graph = tf.compat.v1.saved_model.load(session, [tf.saved_model.SERVING], str(saved_model))
    definitions = get_model_metadata_pb2.SignatureDefMap(signature_def=meta_graph.signature_def)
    return {"model_spec": {"name": MODEL, "signature_name": "", "version": str(version)},
            "metadata": {"signature_def": proto_json(definitions)}}


@pytest.mark.parametrize("where", ["", "/versions/{v}", "/labels/stable", "/labels/canary"])
def test_metadata_equals_the_saved_models_signature_defs(server, model, version, where):
    status, answer = server.json(f"/v1/models/{MODEL}{where.format(v=version)}/metadata")
    assert status == 200
    assert answer == saved_model_metadata(model[0].saved_model, version)
    definitions = answer["metadata"]["signature_def"]["signature_def"]
    assert set(definitions) == {"serving_default", "predict_images"}
    assert definitions["serving_default"]["inputs"]["image_bytes"]["tensor_shape"] == \
        {"dim": [{"size": "-1", "name": ""}], "unknown_rank": False}


def test_rest_and_grpc_metadata_are_one(server):
    """GetModelMetadata over gRPC, printed as TF Serving's REST prints it, is the REST answer."""
    grpc_server = GrpcServer(server.engine, server.app.extensions["imageclf"]["metrics"], host="127.0.0.1", port=0,
                             threads=2, max_message_bytes=1 << 20, max_concurrent_rpcs=4)
    grpc_server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_server.port}") as channel:
            request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
            request.model_spec.name = MODEL
            response = prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(request, timeout=30)
    finally:
        grpc_server.stop(grace=1)
    definitions = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(definitions)
    _, answer = server.json(f"/v1/models/{MODEL}/metadata")
    assert answer["metadata"]["signature_def"] == proto_json(definitions)
    assert answer["model_spec"] == proto_json(response.model_spec)


# -- Status: the JSON of TF Serving's docs ----------------------------------------------------------------


@pytest.mark.parametrize("where", ["", "/versions/{v}", "/labels/stable"])
def test_status_is_tf_servings_json(server, version, where):
    status, answer = server.json(f"/v1/models/{MODEL}{where.format(v=version)}")
    # api_rest.md: GET /v1/models/saved_model_half_plus_three, with our model's version.
    assert status == 200 and answer == {"model_version_status": [
        {"version": str(version), "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}


# -- Predict: row and columnar formats, signatures, versions ----------------------------------------------


def test_predict_rows_are_objects_of_both_outputs(server, pictures, expected):
    status, answer = post(server, f"/v1/models/{MODEL}:predict", {"instances": [b64(p) for p in pictures]})
    # api_rest.md: a model with several named outputs answers {"predictions": [<object per row>, ...]}.
    assert status == 200 and set(answer) == {"predictions"} and len(answer["predictions"]) == 2
    for row, want in zip(answer["predictions"], expected, strict=True):
        assert set(row) == {"scores", "classes"} and row["classes"] == LABELS
        np.testing.assert_allclose(row["scores"], want, rtol=0, atol=1e-4)


def test_predict_columnar_answers_an_object_of_outputs(server, pictures):
    _, rows = post(server, f"/v1/models/{MODEL}:predict", {"instances": [b64(p) for p in pictures]})
    for inputs in ([b64(p) for p in pictures], {"image_bytes": [b64(p) for p in pictures]}):
        status, answer = post(server, f"/v1/models/{MODEL}:predict", {"inputs": inputs})
        # api_rest.md: a columnar request gets {"outputs": {<output name>: <whole tensor>, ...}}.
        assert status == 200 and set(answer) == {"outputs"} and set(answer["outputs"]) == {"scores", "classes"}
        assert answer["outputs"]["classes"] == [LABELS, LABELS]
        assert answer["outputs"]["scores"] == [row["scores"] for row in rows["predictions"]]


def test_named_instances_and_signature_name_serving_default(server, pictures):
    _, bare = post(server, f"/v1/models/{MODEL}:predict", {"instances": [b64(pictures[0])]})
    status, named = post(server, f"/v1/models/{MODEL}:predict",
                         {"signature_name": "serving_default", "instances": [{"image_bytes": b64(pictures[0])}]})
    assert status == 200 and named == bare


def test_predict_images_signature_takes_pixels(server, pictures):
    pixels = [image_to_model_input(decode_image(p, size=SIZE), SIZE).tolist() for p in pictures]
    _, encoded = post(server, f"/v1/models/{MODEL}:predict", {"inputs": [b64(p) for p in pictures]})
    for body in ({"signature_name": "predict_images", "instances": pixels},
                 {"signature_name": "predict_images", "instances": [{"images": x} for x in pixels]}):
        status, answer = post(server, f"/v1/models/{MODEL}:predict", body)
        assert status == 200, answer
        np.testing.assert_allclose([row["scores"] for row in answer["predictions"]], encoded["outputs"]["scores"],
                                   rtol=0, atol=1e-5)
    status, answer = post(server, f"/v1/models/{MODEL}:predict",
                          {"signature_name": "predict_images", "inputs": {"images": pixels}})
    assert status == 200
    np.testing.assert_allclose(answer["outputs"]["scores"], encoded["outputs"]["scores"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("where", ["/versions/{v}", "/labels/stable", "/labels/canary"])
def test_versions_and_labels_routes_predict_and_classify(server, pictures, version, where):
    body = {"instances": [b64(pictures[1])]}
    _, plain = post(server, f"/v1/models/{MODEL}:predict", body)
    status, answer = post(server, f"/v1/models/{MODEL}{where.format(v=version)}:predict", body)
    assert status == 200 and answer == plain
    status, answer = post(server, f"/v1/models/{MODEL}{where.format(v=version)}:classify", body)
    assert status == 200 and [label for label, _ in answer["results"][0]] == LABELS


def test_classify_takes_tf_serving_examples(server, pictures, expected):
    status, answer = post(server, f"/v1/models/{MODEL}:classify",
                          {"examples": [{"image/encoded": b64(p)} for p in pictures]})
    # api_rest.md: {"results": [[[<label>, <score>], ...] per example]}.
    assert status == 200 and len(answer["results"]) == 2
    for result, want in zip(answer["results"], expected, strict=True):
        assert [label for label, _ in result] == LABELS
        np.testing.assert_allclose([score for _, score in result], want, rtol=0, atol=1e-4)


def test_one_output_answers_bare_values():
    """api_rest.md: "If the output of the model contains only one named tensor, we omit the name"."""
    from service.tfs_rest import as_columns, as_rows  # here: the other tests must run without this module

    scores = [[0.25, 0.75], [0.5, 0.5]]
    assert as_rows({"scores": scores}) == scores and as_columns({"scores": scores}) == scores
    both = {"scores": scores, "classes": [["a", "b"], ["a", "b"]]}
    assert as_rows(both) == [{"scores": [0.25, 0.75], "classes": ["a", "b"]},
                             {"scores": [0.5, 0.5], "classes": ["a", "b"]}]
    assert as_columns(both) == both


# -- Errors: {"error": "..."}, 400 for a bad request, 404 for an unknown model or version -------------------


def test_unknown_model_version_and_label(server, pictures, version):
    body = {"instances": [b64(pictures[0])]}
    for path in ("/v1/models/nope:predict", f"/v1/models/{MODEL}/versions/{version + 1}:predict",
                 f"/v1/models/{MODEL}/versions/{version + 1}", f"/v1/models/{MODEL}/versions/{version + 1}/metadata",
                 f"/v1/models/{MODEL}/versions/{version + 1}:regress", "/v1/models/nope", "/v1/models/nope/metadata"):
        status, message = error_of(server, path, body if ":" in path else None)
        assert status == 404 and ("nope" in message or f"no version {version + 1}" in message), (path, message)
    for path in (f"/v1/models/{MODEL}/labels/beta:predict", f"/v1/models/{MODEL}/labels/beta"):
        status, message = error_of(server, path, body if ":" in path else None)
        assert status == 400 and "Unrecognized servable version label: beta" in message
    status, message = error_of(server, f"/v1/models/{MODEL}/versions/{2**64}:predict", body)
    assert status == 400 and "Failed to convert version" in message
    status, message = error_of(server, f"/v1/models/{MODEL}/versions/x1/metadata")
    assert status == 400 and "must be a number" in message


BAD_BODIES = {  # name: (body, words the error must have)
    "rows and columns": ({"instances": [], "inputs": []}, "has both 'instances' (rows) and 'inputs'"),
    "neither": ({"examples": []}, "is missing 'instances' (rows) and 'inputs'"),
    "not an object": ([1, 2], "must be a JSON object"),
    "signature name not a string": ({"signature_name": 100, "instances": []},
                                    "'signature_name' key must be a string value."),
    "unknown signature": ({"signature_name": "predict", "instances": []}, "unknown signature 'predict'"),
    "no instances": ({"instances": []}, "no instances"),
    "instances not a list": ({"instances": {"b64": "AAAA"}}, "'instances' must be a list"),
    "wrong input name": ({"instances": [{"image": {"b64": "AAAA"}}]}, "the signature has one input, 'image_bytes'"),
    "column not a list": ({"inputs": {"b64": "AAAA"}}, "input 'image_bytes' must be a list"),
    "plain string": ({"instances": ["abc"]}, 'instance 0: expected {"b64"'),
    "bad base64": ({"instances": [{"b64": "***"}]}, "instance 0: invalid base64"),
    "not an image": ({"instances": [{"b64": "aGVsbG8="}]}, "not an image"),
    "ragged pixels": ({"signature_name": "predict_images", "inputs": [[[[0.5] * 3] * 32] * 31 + [[[0.5] * 3]]]},
                      "must be numbers nested as [n, height, width, 3]"),
    "pixels as strings": ({"signature_name": "predict_images", "inputs": [[[["x"] * 3] * 32] * 32]},
                          "must be numbers nested"),
    "pixels of another size": ({"signature_name": "predict_images", "instances": [[[[0.5] * 3] * 16] * 16]},
                               "[n, 32, 32, 3]"),
    "pixels over 1": ({"signature_name": "predict_images", "instances": [[[[2.0] * 3] * 32] * 32]}, "[0, 1]"),
}


@pytest.mark.parametrize("case", BAD_BODIES)
def test_bad_predict_bodies_are_400(server, case):
    body, words = BAD_BODIES[case]
    status, message = error_of(server, f"/v1/models/{MODEL}:predict", body)
    assert status in (400, 415) and words in message, message
    assert status == (415 if case == "not an image" else 400)  # this service's 415 for what is not an image


def test_regress_and_classify_with_pixels_are_400(server, pictures):
    status, message = error_of(server, f"/v1/models/{MODEL}:regress", {"examples": [{"image/encoded": b64(b"x")}]})
    assert status == 400 and "Expected regression signature" in message
    status, message = error_of(server, f"/v1/models/{MODEL}:classify",
                               {"signature_name": "predict_images", "instances": [b64(pictures[0])]})
    assert status == 400 and "use the signature 'serving_default'" in message
    status, message = error_of(server, f"/v1/models/{MODEL}:classify", {"examples": [{"caption": "sea"}]})
    assert status == 400 and "example 0 has no image" in message


def test_too_many_instances_is_refused_on_the_count(server):
    status, message = error_of(server, f"/v1/models/{MODEL}:predict", {"inputs": {"image_bytes": [{"b64": "*"}] * 5}})
    assert status == 413 and "5 images in one request; the limit is 4" in message


# -- ?format=lists: the older service's [[labels...], [probabilities...]] ---------------------------------


def test_format_lists_by_path_and_upload(server, model):
    path = "circle/circle_003.jpg"
    _, full = server.json(f"/?file={path}&top_k=2")
    want = [[p["label"] for p in full["predictions"]], [p["score"] for p in full["predictions"]]]
    assert len(want[0]) == 2 and want[1] == sorted(want[1], reverse=True)
    status, answer = server.json(f"/?file={path}&top_k=2&format=lists")
    assert status == 200 and answer == want
    data = (model[1] / path).read_bytes()
    body, headers = multipart("image", "c.jpg", data)
    for route in ("/classify", "/"):
        assert server.json(f"{route}?format=lists&top_k=2", data=body, headers=headers) == (200, want)
        assert server.json(f"{route}?format=lists&top_k=2", data=data, headers={"Content-Type": "image/jpeg"}) == \
            (200, want)
    status, answer = server.json(f"/?file={path}&format=lists")  # the default top_k (5): all three labels
    assert status == 200 and sorted(answer[0]) == LABELS and answer[1] == sorted(answer[1], reverse=True)
    status, answer = server.json(f"/?file={path}&top_k=2&format=full")
    assert status == 200 and answer["predictions"] == full["predictions"] and set(answer) == set(full)


@pytest.mark.parametrize("route, data", [("/?file=circle/circle_003.jpg&format=xml", None),
                                         ("/classify?format=xml", b"x"), ("/?format=xml", b"x")])
def test_unknown_format_is_400_naming_the_formats(server, route, data):
    status, answer = server.json(route, data=data, headers={"Content-Type": "image/jpeg"} if data else None)
    assert status == 400 and set(answer) == {"error"}
    assert "unknown format 'xml'" in answer["error"] and "'full'" in answer["error"] and "'lists'" in answer["error"]
