"""Serving machinery, after TensorFlow Serving's concepts, with no web framework in it.

- ``servable``: a loaded model, reference-counted, closed when its last user lets go;
- ``registry``: the source (a graphs folder), the loader and the version policy (latest wins;
  a failed load never replaces a working version);
- ``batching``: concurrent requests share one model call, with bounded waits;
- ``budget``: a bound on the memory that decoded pixels of in-flight requests may take;
- ``engine``: one request's path from encoded bytes to scores, within those bounds.

The Flask app (``service/``) is a thin skin over ``engine``.
"""
