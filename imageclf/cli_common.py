"""What every command-line entry point shares: quiet TensorFlow, clean errors, exit codes."""

from __future__ import annotations

import os
import sys
from typing import Callable, Sequence


def quiet_tensorflow() -> None:
    """Hide TensorFlow's C++ start-up chatter (CUDA probing on CPU machines and the like)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


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
