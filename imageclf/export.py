"""Writing a retrained classifier: frozen GraphDef, labels, metadata sidecar, SavedModel.

The graph contract (what label_image, the service and TF Serving rely on):
- ``Placeholder:0``  float32 [None, H, W, 3], RGB in [0, 1] (as TF Hub's retrain.py graphs);
- ``image_bytes:0``  string [None], encoded images decoded and resized inside the graph
  (it feeds ``Placeholder`` by default, so feed one or the other); an image over the
  metadata's ``image_bytes_max_pixels`` is refused from its header (InvalidArgument);
- ``final_result:0`` (or ``--final_tensor_name``) float32 [None, classes], softmax;
- ``bottleneck:0``   float32 [None, D], the base model's features;
- ``labels:0``       string [classes]; ``metadata:0`` string scalar, JSON.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf
from google.protobuf.message import DecodeError
from tensorflow.core.protobuf import meta_graph_pb2

from imageclf.atomic import fsync_dir, fsync_tree, write_bytes_atomic, write_text_atomic
from imageclf.bases import BaseModel
from imageclf.history import history_versions
from imageclf.images import DEFAULT_MAX_PIXELS
from imageclf.manifest import manifest_path
from imageclf.preprocess_graph import decode_to_model_input
from imageclf.training import FinalLayer

FORMAT = "imageclf-graph/1"
INPUT_TENSOR = "Placeholder:0"
BYTES_TENSOR = "image_bytes:0"
BOTTLENECK_TENSOR = "bottleneck:0"
LABELS_TENSOR = "labels:0"
METADATA_TENSOR = "metadata:0"


def graph_metadata(base: BaseModel, labels: list[str], final_tensor_name: str, extra: dict) -> dict:
    """The self-description embedded in the graph and written to the ``.json`` sidecar."""
    return {
        "format": FORMAT,
        "input_tensor": INPUT_TENSOR,
        "image_bytes_tensor": BYTES_TENSOR,
        "output_tensor": f"{final_tensor_name}:0",
        "bottleneck_tensor": BOTTLENECK_TENSOR,
        "input_size": list(base.input_size),
        # Pixels p in 0..255 are fed as (p - mean) / std, the convention label_image users know.
        "input_mean": 0.0,
        "input_std": 255.0,
        "labels": list(labels),
        "base_model": base.info(),
        **extra,
    }


def build_graph(base: BaseModel, layer: FinalLayer, labels: list[str], metadata: dict,
                final_tensor_name: str = "final_result", max_pixels: int = DEFAULT_MAX_PIXELS
                ) -> tf.compat.v1.GraphDef:
    """The complete frozen classifier as one GraphDef (every value a constant).

    ``image_bytes:0`` refuses images over ``max_pixels`` from their header, before decoding.
    """
    height, width = base.input_size
    graph = tf.Graph()
    with graph.as_default():
        encoded = tf.compat.v1.placeholder(tf.string, [None], name="image_bytes")
        decoded = tf.map_fn(lambda one: decode_to_model_input(one, base.input_size, max_pixels), encoded,
                            fn_output_signature=tf.TensorSpec([height, width, 3], tf.float32))
        images = tf.compat.v1.placeholder_with_default(decoded, [None, height, width, 3], name="Placeholder")
        features = tf.import_graph_def(base.graph_def, input_map={base.input_name: images},
                                       return_elements=[base.output_name], name="base")[0]
        bottleneck = tf.identity(tf.reshape(features, [-1, base.bottleneck_size]), name="bottleneck")
        with tf.name_scope("final_training_ops"):
            logits = tf.matmul(bottleneck, tf.constant(layer.weights, name="weights")) + \
                tf.constant(layer.biases, name="biases")
        tf.nn.softmax(logits, name=final_tensor_name)
        tf.constant(labels, dtype=tf.string, name="labels")
        tf.constant(json.dumps(metadata), dtype=tf.string, name="metadata")
    return graph.as_graph_def()


def write_outputs(graph_def: tf.compat.v1.GraphDef, metadata: dict, evaluation: dict | None,
                  output_graph: str | Path, output_labels: str | Path, manifest_text: str | None = None) -> Path:
    """The manifest, then the graph, then its labels and sidecar JSON, each replaced atomically.

    The manifest goes first, as the SavedModel does: once the new graph is visible, so is its
    manifest. It is paired with its graph by the data fingerprint the graph embeds (see
    manifest.read_for_graph), so a reader never takes an older or newer manifest for the graph's.

    The graph carries its own labels and metadata, and readers of our graphs (GraphModel, so
    label_image and the service) take nothing from the files beside it, so a reader that sees
    the new graph is consistent whatever state the others are in. Written before it, a new
    sidecar made a polling service reload the old graph beside it: a wasted load, and a failed
    one when the old graph was another script's, whose settings that sidecar had held.
    """
    output_graph = Path(output_graph)
    if manifest_text is not None:
        write_text_atomic(manifest_path(output_graph), manifest_text)
    write_bytes_atomic(output_graph, graph_def.SerializeToString())
    write_text_atomic(output_labels, "".join(f"{label}\n" for label in metadata["labels"]))
    sidecar = output_graph.with_suffix(".json")
    write_text_atomic(sidecar, json.dumps({**metadata, "evaluation": evaluation}, indent=2) + "\n")
    return sidecar


def embedded_metadata(graph: str | Path) -> dict | None:
    """The metadata a graph of ours carries (``metadata:0``), without loading it; None for a
    missing or unreadable file, or a graph that does not describe itself (another script's)."""
    try:
        graph_def = tf.compat.v1.GraphDef.FromString(Path(graph).read_bytes())
    except (OSError, DecodeError):
        return None
    for node in graph_def.node:
        if node.name == METADATA_TENSOR.split(":")[0] and node.op == "Const":
            try:
                metadata = json.loads(tf.make_ndarray(node.attr["value"].tensor).item())
            except (ValueError, TypeError):
                return None
            return metadata if isinstance(metadata, dict) else None
    return None


@dataclass
class VersionReservation:
    """A model version chosen before anything is written, and held until it is published.

    With a SavedModel folder, ``staging`` is the empty folder ``.<version>.tmp`` in it: making
    it is what claims the version, so two retrains never get the same one.
    """

    version: int
    staging: Path | None = None

    def release(self) -> None:
        """Give the version back when nothing was published under it; harmless after publish."""
        staging, self.staging = self.staging, None
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)

    def publish(self, final: Path) -> Path:
        """Make the staged SavedModel appear as ``final`` in one rename, durably."""
        fsync_tree(self.staging)  # TF writes without fsync; a power cut must not leave empty files
        self.staging.rename(final)  # TF Serving watches the parent folder; it must never see a partial version
        self.staging = None  # published: nothing left to release
        fsync_dir(final.parent)
        return final


def reserve_version(export_dir: str | Path | None, output_graph: str | Path | None = None,
                    now: float | None = None) -> VersionReservation:
    """The next version: at least the current time in seconds, above every version seen so far.

    "Seen" means the numbered (and staging) folders in ``export_dir`` and the version in the
    sidecar of the graph about to be replaced, so versions only ever go up, even for two
    retrains within one second. Without ``export_dir`` nothing is reserved on disk.
    """
    version = max(int(time.time() if now is None else now),
                  _newest_version(export_dir, output_graph) + 1)
    if export_dir is None:
        return VersionReservation(version)
    export_dir = Path(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(1000):
        try:
            return _reserve_exact(export_dir, version)
        except FileExistsError:
            version += 1  # taken by a concurrent retrain since we looked: take the next one
    raise FileExistsError(f"{export_dir}: cannot reserve a new version folder")


def _reserve_exact(export_dir: Path, version: int) -> VersionReservation:
    staging = _staging_dir(export_dir, version)
    staging.mkdir()  # atomic: fails when another process holds this version
    if (export_dir / str(version)).exists():
        # Published (and its staging folder renamed away) between our look and our mkdir.
        staging.rmdir()
        raise FileExistsError(f"{export_dir / str(version)} already exists")
    return VersionReservation(version, staging)


def _staging_dir(export_dir: Path, version: int) -> Path:
    return export_dir / f".{version}.tmp"


def _newest_version(export_dir: str | Path | None, output_graph: str | Path | None) -> int:
    versions = [0]
    if export_dir is not None and Path(export_dir).is_dir():
        for entry in Path(export_dir).iterdir():
            name = entry.name.removeprefix(".").removesuffix(".tmp")
            if name.isdigit():
                versions.append(int(name))
    if output_graph is not None:
        versions.append(_sidecar_version(Path(output_graph).with_suffix(".json")))
        # After a rollback the graph's version is an old one; the kept versions stay above it.
        versions += history_versions(output_graph)
    return max(versions)


def _sidecar_version(sidecar: Path) -> int:
    try:
        version = json.loads(sidecar.read_text(encoding="utf-8")).get("version")
    except (OSError, ValueError, AttributeError):
        return 0  # no previous graph, or not one of ours: nothing to stay above
    return version if isinstance(version, int) else 0


def write_saved_model(graph_def: tf.compat.v1.GraphDef, metadata: dict, export_dir: str | Path,
                      reservation: VersionReservation | None = None, manifest_text: str | None = None) -> Path:
    """A versioned SavedModel (``export_dir/<version>/``) that TensorFlow Serving can load.

    Signatures: ``serving_default`` takes ``image_bytes`` (encoded images), ``predict_images``
    takes ``images`` (float32 [None, H, W, 3] in [0, 1]); both return ``scores`` and, per
    image, all labels as ``classes``. ``reservation`` (from reserve_version) must hold
    ``metadata["version"]``; without one, that exact version is claimed here, and
    FileExistsError raised when it is taken. ``manifest_text`` (the training-data manifest) is
    saved as ``assets.extra/manifest.jsonl``, beside the metadata (and its data fingerprint) that
    the graph's ``metadata:0`` constant carries; TF Serving ignores both.
    """
    export_dir = Path(export_dir)
    version = metadata["version"]
    if reservation is None:
        export_dir.mkdir(parents=True, exist_ok=True)
        if (export_dir / str(version)).exists():
            raise FileExistsError(f"{export_dir / str(version)} already exists")
        reservation = _reserve_exact(export_dir, version)
    if reservation.version != version or reservation.staging is None:
        raise ValueError(f"version {version} is not the one reserved ({reservation.version}) or was released")
    try:
        _build_saved_model(graph_def, metadata, reservation.staging)
        if manifest_text is not None:
            (reservation.staging / "assets.extra").mkdir(exist_ok=True)
            (reservation.staging / "assets.extra" / "manifest.jsonl").write_text(manifest_text, encoding="utf-8")
        return reservation.publish(export_dir / str(version))
    except BaseException:
        reservation.release()
        raise


def _predict_signature(inputs: dict[str, tf.Tensor], outputs: dict[str, tf.Tensor]) -> meta_graph_pb2.SignatureDef:
    """tf.compat.v1.saved_model.predict_signature_def's SignatureDef, built directly: that function goes
    through build_tensor_info, which prints a deprecation warning (TF1 API) on every export."""
    def info(tensor: tf.Tensor) -> meta_graph_pb2.TensorInfo:
        return meta_graph_pb2.TensorInfo(name=tensor.name, dtype=tensor.dtype.as_datatype_enum,
                                         tensor_shape=tensor.shape.as_proto())
    signature = meta_graph_pb2.SignatureDef(method_name=tf.saved_model.PREDICT_METHOD_NAME)
    for key, tensor in inputs.items():
        signature.inputs[key].CopyFrom(info(tensor))
    for key, tensor in outputs.items():
        signature.outputs[key].CopyFrom(info(tensor))
    return signature


def _build_saved_model(graph_def: tf.compat.v1.GraphDef, metadata: dict, staging: Path) -> None:
    graph = tf.Graph()
    with graph.as_default():
        tf.import_graph_def(graph_def, name="")
        scores = graph.get_tensor_by_name(metadata["output_tensor"])
        classes = tf.tile(graph.get_tensor_by_name(LABELS_TENSOR)[None, :], [tf.shape(scores)[0], 1])
        outputs = {"scores": scores, "classes": classes}
        signature = _predict_signature
        signatures = {
            "serving_default": signature({"image_bytes": graph.get_tensor_by_name(BYTES_TENSOR)}, outputs),
            "predict_images": signature({"images": graph.get_tensor_by_name(INPUT_TENSOR)}, outputs),
        }
        with tf.compat.v1.Session(graph=graph) as session:
            # The builder accepts the reserved folder because it is still empty.
            builder = tf.compat.v1.saved_model.Builder(str(staging))
            builder.add_meta_graph_and_variables(session, [tf.saved_model.SERVING], signature_def_map=signatures)
            builder.save()
