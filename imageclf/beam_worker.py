"""A worker process of the bottleneck job's local runs: Beam's own SDK worker, started quiet.

Beam starts its local workers as ``python -m apache_beam.runners.worker.sdk_worker_main``, which
says "apitools not found" as it imports Beam, once per worker. The job starts them as
``python -m imageclf.beam_worker`` instead (bottlenecks_job.local_runner): the same worker, with
the job's filter on Beam's noise installed before Beam is imported.
"""

from __future__ import annotations

import logging
import sys

from imageclf.beam_quiet import BeamNoise


def _stderr_handler() -> logging.Handler:
    """The worker's log lines on stderr, as Beam's workers print them, from WARNING up (the job's skip
    messages among them). Installed before Beam loads, so Beam's import does not install its own; the
    worker then sets the root logger to INFO for its log service before the job's levels reach it."""
    handler = logging.StreamHandler()
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
    handler.addFilter(BeamNoise())  # on the handler: it sees what every logger sends up, not only the root's
    return handler


logging.getLogger().addHandler(_stderr_handler())

from apache_beam.runners.worker import sdk_worker_main  # noqa: E402 - after the filter, on purpose

if __name__ == "__main__":
    sdk_worker_main.main(sys.argv)
