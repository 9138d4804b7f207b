"""Which runtime runs a graph: a TensorFlow session (``tf``) or a LiteRT interpreter (``litert``).

``load_classifier`` is the one place that chooses. A graph that LiteRT cannot run (the
converter refuses an op, ai-edge-litert is missing) is served by TensorFlow instead, with the
reason logged and kept on the model (``runtime_note``, shown by the service's ``/models``).
TensorFlow is imported only when a session is needed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from imageclf.classifier import Classifier, GraphSettings

log = logging.getLogger(__name__)

RUNTIMES = ("tf", "litert")


@dataclass(frozen=True)
class RuntimeOptions:
    runtime: str = "tf"
    threads: int = 1              # litert: threads of one interpreter
    interpreters: int = 1         # litert: interpreters per model (invokes at once)
    cache_dir: str | None = None  # litert: converted models (default: litert_model.default_cache_dir())


def load_classifier(path: str | Path, settings: GraphSettings | None = None, options: RuntimeOptions | None = None,
                    *, decode_in_graph: bool = True) -> Classifier:
    """Load the graph at ``path`` on the runtime ``options`` asks for (UserError if it is unusable)."""
    options = options or RuntimeOptions()
    if options.runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {options.runtime!r}")
    note = None
    if options.runtime == "litert":
        from imageclf.litert_model import LiteModel, LiteOptions, LiteRTUnavailable

        try:
            return LiteModel(path, settings, LiteOptions(options.threads, options.interpreters, options.cache_dir))
        except LiteRTUnavailable as e:
            note = f"served by TensorFlow: {e}"
            log.warning("%s: %s", Path(path).name, note)
    from imageclf.cli_common import quiet_tensorflow

    quiet_tensorflow()
    from imageclf.graph_model import GraphModel

    model = GraphModel(path, settings, decode_in_graph=decode_in_graph)
    model.runtime_note = note
    return model
