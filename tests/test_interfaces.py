"""The local and remote twins implement the interfaces the engine relies on (imageclf/engine/interfaces.py).

First from the classes: every method with the protocol's parameters, every attribute declared.
Then from real objects: a registry over a retrained graph, and a registry of a front over a real
gRPC backend (our own gRPC server on 127.0.0.1), each with a model served, checked with
``isinstance`` against the runtime-checkable protocols.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing

import pytest

from imageclf.classifier import Classifier
from imageclf.engine import interfaces
from imageclf.engine.backend_config import BackendOptions
from imageclf.engine.registry import ModelRegistry, ModelStatus
from imageclf.engine.remote import RemoteModel, RemoteRegistry, RemoteServable, RemoteStatus, remote_registry
from imageclf.engine.servable import BatchOptions, Servable

from .conftest import tiny_graphs_dir, wait_until
from .service_helpers import HttpAndGrpc

TWINS = [(interfaces.Registry, [ModelRegistry, RemoteRegistry]),
         (interfaces.ModelState, [ModelStatus, RemoteStatus]),
         (interfaces.Served, [Servable, RemoteServable]),
         (interfaces.ServedModel, [Classifier, RemoteModel])]


def protocol_members(protocol: type) -> tuple[set[str], dict[str, inspect.Signature]]:
    attributes = set(protocol.__annotations__)
    methods = {name: inspect.signature(value) for name, value in vars(protocol).items()
               if inspect.isfunction(value) and not name.startswith("_")}
    return attributes, methods


def declared(cls: type, name: str) -> bool:
    """Whether ``cls`` declares ``name``: an annotation (a dataclass field too), a property or a class value."""
    return any(name in vars(klass).get("__annotations__", {}) or name in vars(klass) for klass in cls.__mro__)


@pytest.mark.parametrize("protocol, implementations", TWINS, ids=[p.__name__ for p, _ in TWINS])
def test_each_twin_has_every_member_with_the_same_parameters(protocol, implementations):
    attributes, methods = protocol_members(protocol)
    assert attributes or methods
    for cls in implementations:
        missing = sorted(name for name in attributes if not declared(cls, name))
        assert not missing, f"{cls.__name__} does not declare {missing} of {protocol.__name__}"
        for name, wanted in methods.items():
            method = getattr(cls, name, None)
            assert callable(method), f"{cls.__name__} has no method {name} of {protocol.__name__}"
            got = inspect.signature(method)
            assert list(got.parameters) == list(wanted.parameters), f"{cls.__name__}.{name}{got} vs {wanted}"
            defaults = [p.default for p in got.parameters.values()]
            assert defaults == [p.default for p in wanted.parameters.values()], f"{cls.__name__}.{name}{got}"


def test_the_dataclass_twins_are_dataclasses():
    # ``declared`` counts dataclass fields through their annotations: make sure that is what they are.
    for cls in (ModelStatus, RemoteStatus, Servable, RemoteModel):
        assert dataclasses.is_dataclass(cls)
    assert typing.get_origin(interfaces.Registry) is None  # a plain Protocol, not a generic


def test_real_local_and_remote_objects_satisfy_the_protocols(tiny_module, shapes_dir, tmp_path):
    graphs = tiny_graphs_dir(shapes_dir, tiny_module, tmp_path, "shapes")
    back = HttpAndGrpc(graphs, shapes_dir)
    front = None
    try:
        local = back.engine.registry
        wait_until(local.ready, "the local registry serves the graph")
        front = remote_registry(BackendOptions(url=f"grpc://127.0.0.1:{back.grpc.port}", models=("shapes",),
                                               poll_seconds=0.2), BatchOptions())
        front.start()
        wait_until(front.ready, "the front's registry serves the backend's model")
        for registry in (local, front):
            assert isinstance(registry, interfaces.Registry)
            status = registry.statuses()[0]
            assert isinstance(status, interfaces.ModelState) and status.state == "ready"
            served = registry.acquire("shapes", None)
            try:
                assert isinstance(served, interfaces.Served)
                assert isinstance(served.model, interfaces.ServedModel)
                assert served.labels == ["circle", "square", "triangle"] and served.model.input_size == (32, 32)
            finally:
                served.release()
    finally:
        if front is not None:
            front.stop()
        back.close()
