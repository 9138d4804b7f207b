"""The serving engine: everything between a request's bytes and its scores, with no transport in it.

After TensorFlow Serving's concepts (the transport skin is ``service/``: Flask routes, TF Serving
REST, Open Inference Protocol v2, the gRPC servers, all thin over ``classify.Engine``):

- ``interfaces``: what the engine relies on, as protocols, each with a local and a remote twin;
- ``servable``: a loaded model version, reference-counted, closed when its last user lets go;
- ``registry``: the source (a graphs folder), the loader and the version policy (latest wins;
  a failed load never replaces a working version; pinned versions kept);
- ``remote`` / ``backend``: the same for models served by a TF Serving-compatible gRPC backend;
- ``batching``: concurrent requests share one model call, with bounded waits;
- ``budget``: a bound on the memory that decoded pixels of in-flight requests may take;
- ``classify``: one request's path from encoded bytes to scores, within those bounds;
- ``signatures``: the model's TF Serving signatures, as every protocol describes them.

Errors a request can get back are ``imageclf.errors.ServingError`` classes: each declares its
HTTP status and gRPC code.
"""
