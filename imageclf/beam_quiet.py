"""Beam's start-up warnings that tell a user of the bottleneck job nothing, left out of its logs.

Imported by the job and by its local worker processes (``imageclf.beam_worker``) before Beam is:
neither TensorFlow nor Beam is imported here.
"""

from __future__ import annotations

import logging

#: Messages that start so are dropped: the BigQuery client the job never uses is absent (said on every
#: ``import apache_beam``, so once per process); flags Beam does not know (the job names them itself,
#: with the closest flag); and the advice to run workers in processes, which the job does (beam_worker).
NOISE = ("apitools not found", "Discarding unparseable args", "If direct_num_workers is not equal to 1")
#: The loggers that say them: Beam's BigQuery package logs on the root logger, the others on their own.
LOGGERS = ("", "apache_beam.options.pipeline_options", "apache_beam.runners.portability.fn_api_runner.fn_runner")


class BeamNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(NOISE)


def quiet_beam() -> None:
    """Install the filter on the loggers that say Beam's noise (once per process)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, BeamNoise) for f in logger.filters):
            logger.addFilter(BeamNoise())
