"""One error table: every error a request can get back declares its HTTP status and gRPC code.

The front ends (service/) read those attributes and keep no table of their own; these tests
find every ``ServingError`` class in the two packages, check what each declares, and check that
docs/serving.md's error table is exactly what the classes say. Each transport answering as the
class declares is tested with real servers in test_v2_protocol (/v1, /v2 over HTTP and gRPC)
and test_grpc (TF Serving's gRPC API).
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import grpc
import pytest

import imageclf
import service
from imageclf.errors import GRPC_CODES, ServingError

DOCS = Path(__file__).resolve().parent.parent / "docs" / "serving.md"


def every_serving_error() -> list[type[ServingError]]:
    for package in (imageclf, service):
        for module in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            if not module.name.endswith("__main__"):
                importlib.import_module(module.name)
    found, todo = [], [ServingError]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if sub.__module__.split(".")[0] in ("imageclf", "service"):  # not a test's class
                found.append(sub)
    return found


def test_every_error_declares_how_each_transport_answers_it():
    classes = every_serving_error()
    names = {c.__name__ for c in classes}
    # The engine's, the backend's, the paths', the protocols': all in the one table.
    assert {"BadInputError", "ModelNotFoundError", "BackendTimeoutError", "PathEscapeError", "ProtocolError",
            "RequestError", "UnknownSignatureError", "UnknownLabelError", "UnimplementedError"} <= names
    for cls in classes:
        assert re.fullmatch(r"[a-z_]+", cls.kind), cls
        assert 400 <= cls.http_status <= 599, cls
        assert cls.grpc_code in grpc.StatusCode.__members__, cls
        assert cls.retry == (cls.http_status == 503), f"{cls.__name__}: Retry-After goes with 503 and only 503"
    assert GRPC_CODES == set(grpc.StatusCode.__members__)


def test_an_error_that_does_not_say_how_it_is_answered_cannot_be_defined():
    with pytest.raises(TypeError, match="must declare http_status, grpc_code"):
        type("Vague", (ServingError,), {"kind": "vague"})
    with pytest.raises(TypeError, match="is not a gRPC status code name"):
        type("Typo", (ServingError,), {"kind": "typo", "http_status": 400, "grpc_code": "INVALID_ARGUMENTS"})


def test_an_instance_may_narrow_its_kind_but_not_its_status():
    from imageclf.errors import BadRequestError

    error = BadRequestError("top_k must be a positive integer", kind="bad_parameter")
    assert (error.kind, error.http_status, error.grpc_code, str(error)) == (
        "bad_parameter", 400, "INVALID_ARGUMENT", "top_k must be a positive integer")
    assert BadRequestError.kind == "bad_request"


def error_table() -> list[str]:
    """docs/serving.md's table rows, one per kind, as the classes declare them."""
    rows = {}
    for cls in every_serving_error():
        row = f"| `{cls.kind}` | {cls.http_status} | {cls.grpc_code} | {'yes' if cls.retry else ''} |"
        assert rows.setdefault(cls.kind, row) == row, f"kind {cls.kind} is declared with two different statuses"
    return [rows[kind] for kind in sorted(rows, key=lambda k: (rows[k].split("|")[2], k))]


def cells(row: str) -> list[str]:
    return [cell.strip() for cell in row.split("|")[1:5]]


def test_the_docs_error_table_is_the_classes():
    documented = [cells(line) for line in DOCS.read_text().splitlines() if re.match(r"\| `[a-z_]+` \| \d{3} \|", line)]
    expected = error_table()
    assert documented == [cells(row) for row in expected], (
        "docs/serving.md's error table should read:\n" + "\n".join(row + " ... |" for row in expected))
