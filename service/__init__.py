"""The transport skin over the engine (``imageclf.engine``): HTTP and gRPC, no model logic.

Flask routes (``app``: /v1 and the page; ``tfs_rest``: TF Serving REST; ``v2_api``: Open
Inference Protocol v2), the gRPC servers (``grpc_api``, ``v2_grpc``) and the HTTP server under
load (``server``, ``admission``, ``connections``, ``framing``). ``service.app.create_app`` builds
the WSGI app; ``python -m service`` serves it. Nothing is imported here, so that
``python -m service`` can quiet TensorFlow before loading it.
"""
