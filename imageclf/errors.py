"""Errors that carry a message meant for the user, not a traceback.

Two families: ``UserError`` (command-line tools: bad input or flags, exit status 2) and
``ServingError``, the one table of what a request can get back. Each ``ServingError`` class
declares how every transport answers it (HTTP status, gRPC code, a Retry-After for 503s); the
front ends in ``service/`` (the /v1 API, TF Serving REST, Open Inference Protocol v2 over HTTP
and gRPC, TF Serving gRPC) read those attributes and keep no table of their own. Anything else
a request handler raises is a bug: logged, and answered 500 / INTERNAL.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

#: The most characters of one client value (a model name, a path...) that an error message quotes.
ECHO_CHARS = 100
#: The most values of a client's list (input keys, output names...) that an error message quotes.
ECHO_ITEMS = 5


def echo(value: object, limit: int = ECHO_CHARS) -> str:
    """A client's value as an error message may quote it: cut to ``limit`` characters.

    Errors go back in JSON and in gRPC trailers, which clients refuse past 8-16 KB of metadata:
    a 100 KB model name must not come back whole. The cut says how long the value was.
    """
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def echo_list(values: Iterable[object]) -> str:
    """A client's list of values for an error message: at most ECHO_ITEMS of them, each cut by ``echo``."""
    values = list(values)
    shown = [echo(v) for v in values[:ECHO_ITEMS]]
    more = f" and {len(values) - ECHO_ITEMS:,} more" if len(values) > ECHO_ITEMS else ""
    return f"[{', '.join(repr(v) for v in shown)}]{more}"


class UserError(Exception):
    """A problem with the user's input or flags; command-line tools exit with status 2."""


class BadImageError(UserError):
    """A file or upload that cannot be used as an image (empty, corrupt, too large...).

    ``reason`` is the short kind of problem, shared by every file skipped for it: a retrain's
    summary counts skipped files by reason.
    """

    reason = "empty, truncated or corrupt"


class NotAnImageError(BadImageError):
    """Content that no image decoder recognises (a text file, a PDF...)."""

    reason = "not an image"


class ImageTooLargeError(BadImageError):
    """An image whose pixel count is over the configured limit (decompression bombs)."""

    reason = "too many pixels"


class UnreadableFileError(BadImageError):
    """A file that cannot be opened or read (gone, no permission, not a regular file)."""

    reason = "cannot be read"


class FileTooLargeError(BadImageError):
    """A file over the size limit; refused from its size, before its content is read."""

    reason = "file over the size limit"


class OutsideRootError(BadImageError):
    """A path that leads outside the folder being read, through a symlink; never opened."""

    reason = "symlink leading outside --image_dir"


#: gRPC status code names (grpc.StatusCode members), so this module needs no gRPC.
GRPC_CODES = frozenset({
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"})


class ServingError(Exception):
    """A request the service will not or cannot answer, and how each transport says so.

    ``kind`` names the error in metrics (``imageclf_errors_total``) and may be narrowed per
    instance (``BadRequestError("...", kind="missing_parameter")``); ``http_status`` is the
    status of the JSON ``{"error": message}`` answer on /v1, TF Serving REST and /v2;
    ``grpc_code`` the status code on TF Serving's and v2's gRPC APIs; ``retry`` adds
    ``Retry-After: 1`` (the client should come back shortly). Every subclass must declare the
    first three or inherit them from a class that does: there is no default.
    """

    kind: ClassVar[str]
    http_status: ClassVar[int]
    grpc_code: ClassVar[str]
    retry: ClassVar[bool] = False

    def __init__(self, message: str, *, kind: str | None = None):
        super().__init__(message)
        if kind is not None:
            self.kind = kind

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        missing = [name for name in ("kind", "http_status", "grpc_code") if not hasattr(cls, name)]
        if missing:
            raise TypeError(f"{cls.__name__} must declare {', '.join(missing)} (see ServingError)")
        if cls.grpc_code not in GRPC_CODES:
            raise TypeError(f"{cls.__name__}.grpc_code {cls.grpc_code!r} is not a gRPC status code name")


class BadRequestError(ServingError):
    """The request is malformed or does not fit the model; the same request will fail again."""

    kind, http_status, grpc_code = "bad_request", 400, "INVALID_ARGUMENT"


class UnsupportedMediaTypeError(BadRequestError):
    """The body is not of a type we read (not an image, not JSON, compressed)."""

    kind, http_status = "unsupported_media_type", 415


class TooLargeError(BadRequestError):
    """Over a size bound that retrying cannot pass (bytes, parts, images in one request).

    gRPC says INVALID_ARGUMENT, as TF Serving answers a batch over its maximum.
    """

    kind, http_status = "too_large", 413


class ForbiddenError(ServingError):
    """A path the service may not read (outside ``--image_root``, no permission)."""

    kind, http_status, grpc_code = "forbidden_path", 403, "PERMISSION_DENIED"


class NotFoundError(ServingError):
    """No such model, version or file."""

    kind, http_status, grpc_code = "not_found", 404, "NOT_FOUND"


class UnavailableError(ServingError):
    """Nothing to serve right now (no model loaded yet, a model call failed): retry shortly."""

    kind, http_status, grpc_code, retry = "unavailable", 503, "UNAVAILABLE", True


class BusyError(UnavailableError):
    """The service is at a bound (queue, decode budget, batch wait): retry shortly."""

    kind = "busy"


class BadGatewayError(ServingError):
    """The model backend (``--backend``) failed, or answered outside our export's contract.

    gRPC has no 502: UNAVAILABLE, the code gRPC's own HTTP mapping gives it.
    """

    kind, http_status, grpc_code = "backend_error", 502, "UNAVAILABLE"


class UnimplementedError(ServingError):
    """A method of a protocol we do not serve (TF Serving's Regress, MultiInference...)."""

    kind, http_status, grpc_code = "unimplemented", 501, "UNIMPLEMENTED"
