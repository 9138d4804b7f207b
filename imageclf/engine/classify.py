"""One request's path from encoded image bytes to scores, within the service's bounds.

Every bound that protects the process lives here, so each front end (the Flask app, a gRPC
server) gets the same behaviour: the pixel limit from the header, the decode memory budget,
the number of images per request, batching and its timeout, and a served version that stays
alive until the request is done with it. Errors are typed: each says how every transport answers it
(``imageclf.errors.ServingError``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from imageclf.engine.batching import BatchFailedError, BatchTimeoutError
from imageclf.engine.budget import BudgetBusyError, BudgetExceededError, MemoryBudget
from imageclf.engine.interfaces import Registry, Served
from imageclf.engine.registry import NoModelError, UnknownModelError, UnknownVersionError
from imageclf.engine.servable import RetiredError
from imageclf.engine.trim import BIG_BYTES, BurstTrimmer
from imageclf.errors import (
    BadImageError,
    BadRequestError,
    BusyError,
    ImageTooLargeError,
    NotAnImageError,
    NotFoundError,
    TooLargeError,
    UnavailableError,
    UnsupportedMediaTypeError,
    echo,
)
from imageclf.images import DEFAULT_MAX_PIXELS, decode_opened, decoded_nbytes, open_image


class BadInputError(BadRequestError):
    kind = "bad_image"


class NotAnImageInputError(UnsupportedMediaTypeError):
    kind = "not_an_image"


class TooManyPixelsError(BadRequestError):
    kind = "too_many_pixels"


class TooManyInstancesError(TooLargeError):
    kind = "too_many_instances"


class BadTensorError(BadRequestError):
    """Pixels sent as a tensor have the wrong shape or values outside [0, 1]."""

    kind = "bad_input"


class ModelNotFoundError(NotFoundError):
    kind = "unknown_model"


class VersionNotFoundError(NotFoundError):
    """The model is served, but not in the version asked for."""

    kind = "unknown_version"


@dataclass(frozen=True)
class Limits:
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_instances: int = 64                 # images in one :predict / :classify request
    memory_budget_bytes: int = 1 << 30      # decoded pixels of all in-flight requests together
    budget_wait_s: float = 2.0              # how long a request waits for room in the budget


@dataclass
class Answer:
    """Scores for one or more images from one served version."""

    name: str
    version: int
    labels: list[str]
    scores: np.ndarray                      # [n, classes]
    decode_ms: float
    inference_ms: float

    def top_k(self, row: int, k: int) -> list[tuple[str, float]]:
        order = np.argsort(-self.scores[row], kind="stable")[:k]
        return [(self.labels[i], float(self.scores[row][i])) for i in order]


class Engine:
    def __init__(self, registry: Registry, limits: Limits | None = None):
        self.registry = registry
        self.limits = limits or Limits()
        self.budget = MemoryBudget(self.limits.memory_budget_bytes, self.limits.budget_wait_s)
        self.trimmer = BurstTrimmer(busy=lambda: self.budget.used >= BIG_BYTES)

    def classify(self, images: Sequence[bytes], model: str | None = None,
                 names: Sequence[str] | None = None, version: int | None = None) -> Answer:
        """Scores for encoded images (one upload, or a TF Serving request's instances)."""
        self.check_count(len(images))
        # Names only label error messages; a client's (a file name, a path) is quoted cut short.
        names = [echo(n) for n in names] if names is not None else [f"instance {i}" for i in range(len(images))]
        with self.hold(model, version) as servable:
            size = servable.model.input_size
            opened = [self._open(data, name, size) for data, name in zip(images, names, strict=True)]
            started = time.perf_counter()
            inputs = [self._model_input(servable, img, name) for img, name in zip(opened, names, strict=True)]
            decoded = time.perf_counter()
            return self._answer(servable, inputs, started, decoded)

    def classify_pixels(self, shape: Sequence[int], pixels: Callable[[], np.ndarray], model: str | None = None,
                        version: int | None = None) -> Answer:
        """Scores for images the client decoded and resized: float32 ``[n, H, W, 3]`` in [0, 1].

        ``shape`` is checked (count, and the served model's input size) before ``pixels()``
        builds the array, inside the decode budget, so a request cannot make the service
        allocate for a shape it will refuse. The pixels then take the same batched model call as
        decoded images, scaled the way the graph expects (see GraphModel.model_input).
        """
        shape = tuple(int(d) for d in shape)
        if len(shape) != 4:
            raise BadTensorError(f"images must have the shape [n, height, width, 3], not {list(shape)}")
        self.check_count(shape[0])
        with self.hold(model, version) as servable:
            expected = (*servable.model.input_size, 3)
            if shape[1:] != expected:
                raise BadTensorError(f"images must have the shape [n, {expected[0]}, {expected[1]}, 3] for model "
                                     f"{servable.name}, not {list(shape)} (resize them to the model's input size)")
            started = time.perf_counter()
            # The array, and the scaled copy that graphs fed (p - mean) / std need.
            try:
                with self._reserved(2 * 4 * math.prod(shape)):
                    inputs = _scaled_inputs(servable, _checked_pixels(pixels(), shape))
            except BudgetExceededError as e:
                raise TooManyPixelsError(str(e)) from None
            except BudgetBusyError as e:
                raise BusyError(str(e)) from None
            return self._answer(servable, inputs, started, time.perf_counter())

    def _answer(self, servable: Served, inputs: list[np.ndarray], started: float, decoded: float) -> Answer:
        scores = self._predict(servable, inputs)
        return Answer(name=servable.name, version=servable.version, labels=list(servable.labels),
                      scores=np.stack(scores), decode_ms=1000 * (decoded - started),
                      inference_ms=1000 * (time.perf_counter() - decoded))

    def check_count(self, n: int) -> None:
        """Refuse a request with no images or more than ``max_instances``, before any work."""
        if n == 0:
            raise BadInputError("no instances in the request")
        if n > self.limits.max_instances:
            raise TooManyInstancesError(f"{n:,} images in one request; the limit is "
                                        f"{self.limits.max_instances:,} (split the request)")

    @contextmanager
    def hold(self, model: str | None = None, version: int | None = None) -> Iterator[Served]:
        """Hold the served version of ``model`` (None: the default) for the ``with`` block.

        With ``version``, only that version will do: the served one is checked while held, so a
        reload in between cannot answer from another version.
        """
        servable = self._acquire(model, version)
        try:
            if version is not None and version != servable.version:
                raise VersionNotFoundError(f"model {servable.name} has no version {version} "
                                           f"(serving version {servable.version})")
            yield servable
        finally:
            servable.release()

    def _acquire(self, model: str | None, version: int | None = None) -> Served:
        try:
            return self.registry.acquire(model, version)  # the served version, or a pinned one
        except NoModelError as e:
            raise UnavailableError(str(e)) from None
        except UnknownModelError as e:
            raise ModelNotFoundError(str(e)) from None
        except UnknownVersionError as e:
            raise VersionNotFoundError(str(e)) from None

    def _open(self, data: bytes, name: str, size: Sequence[int]):
        """Parse the header only (format, size; a JPEG set to decode at the scale the model needs)."""
        try:
            return open_image(data, max_pixels=self.limits.max_pixels, name=name, size=size)
        except BadImageError as e:
            raise _image_error(e) from None

    def _model_input(self, servable: Served, img, name: str) -> np.ndarray:
        """Decode within the budget; only the small model input outlives the reservation."""
        try:
            with self._reserved(decoded_nbytes(img) + _model_input_overhead(img)):
                try:
                    # A gray image stays one channel up to the resize: a third of the work (same numbers).
                    return servable.model.model_input(decode_opened(img, name=name, keep_gray=True))
                finally:
                    # load() left the decoded pixels in ``img``, which the request keeps until it is
                    # answered: free them here, inside the reservation that counted them, so the trim
                    # after it finds them free and the next image's reservation does not overlap them.
                    img.close()
        except BadImageError as e:
            raise _image_error(e) from None
        except BudgetExceededError as e:
            raise TooManyPixelsError(f"{name}: {e}") from None
        except BudgetBusyError as e:
            raise BusyError(str(e)) from None

    @contextmanager
    def _reserved(self, nbytes: int) -> Iterator[None]:
        """Decode memory from the budget; once a big reservation ends its pages go back to the OS."""
        try:
            with self.budget.reserve(nbytes):
                yield
        finally:
            self.trimmer.released(nbytes)

    def _predict(self, servable: Served, inputs: list[np.ndarray]) -> list[np.ndarray]:
        try:
            return servable.predict(inputs)
        except BatchTimeoutError as e:
            raise BusyError(str(e)) from None
        except (BatchFailedError, RetiredError) as e:
            raise UnavailableError(str(e)) from None


def _checked_pixels(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if array.shape != shape:
        raise BadTensorError(f"images hold {array.size:,} values, not the {math.prod(shape):,} "
                             f"of their shape {list(shape)}")
    array = np.asarray(array, np.float32)
    # A client that sends 0..255 by mistake would otherwise get confident nonsense.
    if array.size and not (np.isfinite(array).all() and array.min() >= 0.0 and array.max() <= 1.0):
        raise BadTensorError("image values must be finite and in [0, 1] (divide 8-bit pixels by 255)")
    return array


def _scaled_inputs(servable: Served, array: np.ndarray) -> list[np.ndarray]:
    """Pixels in [0, 1] -> what the graph's input takes: the scaling step of GraphModel.model_input."""
    model = servable.model
    if (model.input_mean, model.input_std) != (0.0, 255.0):
        array = (array * 255.0 - model.input_mean) / model.input_std
    return list(array)


def _model_input_overhead(img) -> int:
    """Bytes that turning decoded pixels into model input takes on top of decoding.

    The resize runs on float32 at the decoded size (12 bytes a pixel) after a uint8 copy into
    TensorFlow (3 bytes a pixel). ``img.size`` is already the reduced size of a drafted JPEG.
    """
    width, height = img.size
    return width * height * 15


def _image_error(e: BadImageError) -> BadRequestError:
    if isinstance(e, NotAnImageError):
        return NotAnImageInputError(str(e))
    if isinstance(e, ImageTooLargeError):
        return TooManyPixelsError(str(e))
    return BadInputError(str(e))
