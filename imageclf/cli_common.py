"""What every command-line entry point shares: quiet TensorFlow, clean errors, exit codes."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence


def quiet_tensorflow() -> None:
    """Import TensorFlow without its C++ start-up chatter (CUDA probing on CPU machines...).

    Some of those lines are printed before TensorFlow's logging honours TF_CPP_MIN_LOG_LEVEL,
    so standard error is silenced at the file-descriptor level for the import alone.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" in sys.modules or os.environ["TF_CPP_MIN_LOG_LEVEL"] != "3":
        return
    with stderr_silenced():
        import tensorflow  # noqa: F401


@contextlib.contextmanager
def stderr_silenced() -> Iterator[None]:
    """Standard error closed at the file-descriptor level, for C++ libraries that print at start-up
    (TensorFlow's CUDA probing, LiteRT's "Created TensorFlow Lite XNNPACK delegate" on every interpreter).

    Errors still arrive as Python exceptions.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def run(prog: str, main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Call ``main``; a UserError becomes one line on stderr and exit status 2, not a traceback."""
    from imageclf.errors import UserError

    try:
        return main(argv)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose errors are one line: a tool with thirty flags would print them all before the message."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
