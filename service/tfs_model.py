"""What TensorFlow Serving tells about a served model, shared by its REST and gRPC APIs.

One source for both: a model's version status, its version labels, and its SignatureDefs (from
``imageclf.engine.signatures``). gRPC turns them into protos (tfs_protos); REST writes them as
the proto3 JSON TF Serving writes (``MessageToJsonString`` with ``always_print_primitive_fields``
and ``preserve_proto_field_names``: int64 as strings, enums by name, empty fields printed).
No TensorFlow import here, so HTTP alone (``--runtime litert --grpc_port 0``) stays without it.
"""

from __future__ import annotations

from dataclasses import dataclass

from imageclf.engine.classify import Engine, ModelNotFoundError, VersionNotFoundError
from imageclf.engine.signatures import Signature, TensorSpec
from imageclf.errors import BadRequestError, echo

#: DataType enum names of the dtypes signatures use.
DTYPE_NAMES = {"string": "DT_STRING", "float32": "DT_FLOAT"}
#: Version labels a request may name instead of a version. The service serves one version of a
#: model (the graph in --graphs_dir), so both name it; TF Serving knows the labels its config sets.
VERSION_LABELS = ("stable", "canary")


class UnknownLabelError(BadRequestError):
    """A version label this service does not know (TF Serving: INVALID_ARGUMENT)."""

    kind = "unknown_label"


def check_label(label: str) -> None:
    """Accept a label of VERSION_LABELS (it names the served version), refuse any other."""
    if label not in VERSION_LABELS:
        raise UnknownLabelError(f"Unrecognized servable version label: {echo(label)} (the labels here are "
                                f"{' and '.join(repr(v) for v in VERSION_LABELS)}, both the served version)")


@dataclass(frozen=True)
class VersionStatus:
    """One ModelVersionStatus: enum names as TF Serving's JSON spells them."""

    version: int
    state: str                  # ModelVersionStatus.State: AVAILABLE, LOADING, END
    error_code: str = "OK"      # tensorflow.error.Code
    error_message: str = ""

    def as_json(self) -> dict:
        return {"version": str(self.version), "state": self.state,
                "status": {"error_code": self.error_code, "error_message": self.error_message}}


def version_status(engine: Engine, name: str, version: int | None) -> VersionStatus:
    """GetModelStatus of ``name`` (``version`` None: whichever is served); unknown ones raise NOT_FOUND errors."""
    statuses = {s.name: s for s in engine.registry.statuses()}
    if name not in statuses:
        raise ModelNotFoundError(f"unknown model '{echo(name)}' (known: {', '.join(sorted(statuses)) or 'none'})")
    status = statuses[name]
    served = status.served
    if served is not None and version is not None and version != served.version:
        raise VersionNotFoundError(f"model {name} has no version {version} (serving version {served.version})")
    if served is not None:
        return VersionStatus(served.version, "AVAILABLE")
    if status.state == "loading":
        return VersionStatus(version or 0, "LOADING")
    # The graph failed to load and no earlier version is served.
    return VersionStatus(version or 0, "END", "UNKNOWN", status.error or "load failed")


def signature_def_map_json(signatures: dict[str, Signature]) -> dict:
    """A SignatureDefMap's ``signature_def`` field as TF Serving's REST metadata writes it."""
    return {name: {"inputs": {signature.input.key: tensor_info_json(signature.input)},
                   "outputs": {o.key: tensor_info_json(o) for o in signature.outputs},
                   "method_name": signature.method_name,
                   "defaults": {}}
            for name, signature in signatures.items()}


def tensor_info_json(spec: TensorSpec) -> dict:
    info = {"dtype": DTYPE_NAMES[spec.dtype],
            "tensor_shape": {"dim": [{"size": str(d), "name": ""} for d in spec.shape], "unknown_rank": False}}
    if spec.tensor_name:  # a member of the ``encoding`` oneof: printed only when set
        info["name"] = spec.tensor_name
    return info
