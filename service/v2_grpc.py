"""The Open Inference Protocol v2 over gRPC: ``inference.GRPCInferenceService``, as Triton serves it.

The protos are tritonclient's (``tritonclient.grpc.service_pb2``), the client most v2 users
have. Registered on the gRPC server beside TF Serving's services (grpc_api.GrpcServer), with the
same error mapping and metrics. Inputs come as ``raw_input_contents`` (what tritonclient
sends: BYTES as 4-byte little-endian length + bytes per element, FP32 raw little-endian) or as
typed ``contents``; outputs always as ``raw_output_contents``, as Triton answers them.
Server and model readiness are booleans: an unknown or unloaded model is ``ready: false``, as
tritonclient.http's ``is_model_ready`` sees a 404 or 503. Methods other than those of the HTTP
API (model config, statistics, repository, shared memory, streaming) are UNIMPLEMENTED.
"""

from __future__ import annotations

from collections.abc import Callable

from tritonclient.grpc import service_pb2

from imageclf.engine.classify import Engine
from imageclf.errors import ServingError, echo
from service import v2_protocol as v2

SERVICE = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]


class V2Handlers:
    """GRPCInferenceService's methods, request message in, response message out."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def methods(self) -> dict[str, tuple[type, Callable]]:
        return {"ServerLive": (service_pb2.ServerLiveRequest, self._live),
                "ServerReady": (service_pb2.ServerReadyRequest, self._ready),
                "ModelReady": (service_pb2.ModelReadyRequest, self._model_ready),
                "ServerMetadata": (service_pb2.ServerMetadataRequest, self._server_metadata),
                "ModelMetadata": (service_pb2.ModelMetadataRequest, self._model_metadata),
                "ModelInfer": (service_pb2.ModelInferRequest, self._infer)}

    def _live(self, request):
        return service_pb2.ServerLiveResponse(live=True)

    def _ready(self, request):
        return service_pb2.ServerReadyResponse(ready=self.engine.registry.ready())

    def _model_ready(self, request):
        try:
            v2.model_ready(self.engine, request.name, v2.parse_version(request.version))
        except ServingError:
            return service_pb2.ModelReadyResponse(ready=False)
        return service_pb2.ModelReadyResponse(ready=True)

    def _server_metadata(self, request):
        return service_pb2.ServerMetadataResponse(**v2.server_metadata())

    def _model_metadata(self, request):
        meta = v2.model_metadata(self.engine, request.name, v2.parse_version(request.version))
        tensor = service_pb2.ModelMetadataResponse.TensorMetadata
        return service_pb2.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]], outputs=[tensor(**t) for t in meta["outputs"]])

    def _infer(self, request: service_pb2.ModelInferRequest) -> service_pb2.ModelInferResponse:
        version = v2.parse_version(request.model_version)
        default_base64 = _base64(request.parameters, "the request")
        inputs = _inputs(request, default_base64)
        outputs = [_output(o) for o in request.outputs]
        v2.check_outputs(outputs)
        tensor = v2.compact(self.engine, v2.one_input(inputs))
        answer = v2.classify(self.engine, request.model_name, version, tensor)
        response = service_pb2.ModelInferResponse(model_name=answer.name, model_version=str(answer.version),
                                                  id=request.id)
        for out in v2.outputs(answer, outputs, binary=True):
            response.outputs.add(name=out.name, datatype=out.datatype, shape=out.shape)
            response.raw_output_contents.append(out.raw())
        return response


def _inputs(request: service_pb2.ModelInferRequest, default_base64: bool) -> list[v2.InputTensor]:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise v2.ProtocolError(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs: give "
                               "one for each input, or none")
    inputs = []
    for i, item in enumerate(request.inputs):
        where = f"input '{echo(item.name)}'"
        if "shared_memory_region" in item.parameters:
            raise v2.ProtocolError("the shared memory extension is not supported: send the data in the request")
        base64 = _base64(item.parameters, where) if "content_type" in item.parameters else default_base64
        tensor = v2.InputTensor(name=item.name, datatype=item.datatype, shape=v2.check_shape(item.name,
                                list(item.shape)), base64=base64)
        if raw:
            tensor.raw = raw[i]
        elif item.datatype == "BYTES" and item.contents.bytes_contents:
            tensor.raw = v2.serialize_bytes(item.contents.bytes_contents)
        elif item.contents.fp32_contents:
            tensor.data = list(item.contents.fp32_contents)
        inputs.append(tensor)
    return inputs


def _output(item) -> v2.OutputRequest:
    parameter = item.parameters.get("classification")
    count = 0
    if parameter is not None:
        if parameter.WhichOneof("parameter_choice") not in ("int64_param", "uint64_param"):
            raise v2.ProtocolError(f"output '{echo(item.name)}': classification must be an integer")
        count = parameter.int64_param or parameter.uint64_param
    return v2.OutputRequest(item.name, count, binary=True)


def _base64(parameters, where: str) -> bool:
    parameter = parameters.get("content_type")
    if parameter is None:
        return False
    if parameter.WhichOneof("parameter_choice") != "string_param" or parameter.string_param != "base64":
        raise v2.ProtocolError(f"{where}: content_type must be 'base64' (or none)")
    return True
