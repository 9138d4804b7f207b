"""What the engine and the routes rely on, declared once; each has a local and a remote twin.

======================  ===========================================  ===============================
interface               local: graphs in a folder                    remote: ``--backend``
======================  ===========================================  ===============================
``Registry``            ``registry.ModelRegistry``                   ``remote.RemoteRegistry``
``ModelState``          ``registry.ModelStatus``                     ``remote.RemoteStatus``
``Served``              ``servable.Servable``                        ``remote.RemoteServable``
``ServedModel``         ``classifier.Classifier`` (``GraphModel``,   ``remote.RemoteModel``
                        ``LiteRTModel``)
======================  ===========================================  ===============================

In TensorFlow Serving's words: a ``Registry`` is the source, loader and manager; a ``Served`` is
one request's reference to a servable version. tests/test_interfaces.py checks that every twin
has every member declared here with the same parameters, and the real objects of a running
service and of a backend front against these protocols.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class ServedModel(Protocol):
    """A loaded model as the engine and the signatures read it."""

    labels: list[str]
    input_size: tuple[int, int]
    input_mean: float                   # pixels are scaled as (p - mean) / std before the model
    input_std: float
    metadata: dict | None
    input_name: str
    output_name: str
    bytes_input_name: str | None

    def model_input(self, pixels: np.ndarray) -> np.ndarray:
        """Decoded RGB uint8 ``[h, w, 3]`` -> the model's float32 ``[H, W, 3]`` input."""
        ...


@runtime_checkable
class Served(Protocol):
    """One reference to one version of a model; ``release`` it when done."""

    name: str
    version: int
    model: ServedModel
    labels: list[str]

    def acquire(self) -> bool:
        """Take one more reference; False when the version is already closed."""
        ...

    def release(self) -> None: ...

    def predict(self, model_inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Scores for model inputs (one row each), through the version's batcher."""
        ...


@runtime_checkable
class ModelState(Protocol):
    """What a registry knows of one model name (``/models``, readiness, TF Serving's status)."""

    name: str
    state: str                          # ready | loading | failed (remote: also unavailable)
    error: str | None
    served: object | None               # the version served now, if any

    def describe(self) -> dict:
        """The model as ``GET /models`` shows it."""
        ...


@runtime_checkable
class Registry(Protocol):
    """The models a service serves: where they come from, which version is served, who is ready."""

    def acquire(self, name: str | None = None, version: int | None = None) -> Served:
        """A reference to the served version of ``name`` (None: the default model); with ``version``,
        that version if it is kept loaded. Raises UnknownModelError, NoModelError, UnknownVersionError."""
        ...

    def statuses(self) -> list[ModelState]: ...

    def ready(self) -> bool:
        """Whether every model has a version to serve."""
        ...

    def not_ready_reason(self) -> str: ...

    def add_listener(self, listener: Callable[[str, bool], None]) -> None:
        """Call ``listener(model_name, ok)`` after each load (local) or metadata fetch (remote)."""
        ...

    def start(self) -> None: ...

    def stop(self) -> None: ...
