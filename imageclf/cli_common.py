"""What every command-line entry point shares: quiet TensorFlow, clean errors, exit codes."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import sys
from collections.abc import Callable, Iterator, Sequence

#: TF_CPP_MIN_LOG_LEVEL values that ask for TensorFlow's info or warning lines: its start-up is left audible.
_TF_VERBOSE_LEVELS = {"0", "1"}

#: Import names whose distribution is called otherwise, for the missing-package line.
_DISTRIBUTIONS = {"PIL": "Pillow", "pillow_heif": "pillow-heif", "tf_keras": "tf-keras",
                  "tensorflow_hub": "tensorflow-hub", "tensorflow_serving": "tensorflow-serving-api",
                  "prometheus_client": "prometheus-client", "ai_edge_litert": "ai-edge-litert",
                  "apache_beam": "apache-beam"}


def quiet_tensorflow() -> None:
    """Import TensorFlow without its C++ start-up chatter (CUDA probing on CPU machines...).

    Some of those lines are printed before TensorFlow's logging honours TF_CPP_MIN_LOG_LEVEL,
    so standard error is silenced at the file-descriptor level for the import alone, at level 3 (our default)
    and at 2 (errors only: the container image's setting, where the probing would otherwise log "errors"
    about CUDA at every start). 0 and 1 ask for TensorFlow's own lines, and get them.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" in sys.modules or os.environ["TF_CPP_MIN_LOG_LEVEL"].strip() in _TF_VERBOSE_LEVELS:
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
        with missing_packages_exit(prog):
            return main(argv)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


@contextlib.contextmanager
def missing_packages_exit(prog: str) -> Iterator[None]:
    """A third-party package this Python lacks (run outside the project's virtualenv) becomes one line and
    exit status 2, not a traceback; a module of our own that is missing is a bug, and stays a traceback."""
    try:
        yield
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if not top or top in {"imageclf", "service"}:
            raise
        package = f"{top} ({_DISTRIBUTIONS[top]})" if top in _DISTRIBUTIONS else top
        print(f"{prog}: error: missing package {package} in {sys.executable}; run `bash scripts/setup.sh` and use "
              ".venv/bin/python (or pip install . into your environment)", file=sys.stderr)
        sys.exit(2)


def unknown_flag_message(prog: str, flag: str, known: Sequence[str]) -> str:
    """One line (without the "PROG: error: " that the caller puts first) for a flag nobody defines, naming the
    closest one that is defined when there is one."""
    name = flag.split("=", 1)[0]
    close = difflib.get_close_matches(name, sorted({k for k in known if k.startswith("--")}), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else f" (see {prog} --help)"
    return f"unknown flag {name}{hint}"


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose errors are one line: a tool with thirty flags would print them all before the message.

    A flag it does not know is named with the closest one it does know (``--image_directory``: did you
    mean ``--image_dir``?), before anything else is checked: a mistyped required flag is a typo, not a
    missing flag.
    """

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None):
        argv = sys.argv[1:] if args is None else list(args)
        unknown = self.unknown_flags(argv)
        if unknown:
            self.exit(2, f"{self.prog}: error: {unknown_flag_message(self.prog, unknown[0], self.option_strings())}\n")
        return super().parse_args(argv, namespace)

    def option_strings(self) -> list[str]:
        return [option for action in self._actions for option in action.option_strings]

    def unknown_flags(self, argv: Sequence[str]) -> list[str]:
        """The --flags in ``argv`` that are neither ours nor (with allow_abbrev) a prefix of ours."""
        known = self.option_strings()
        found = []
        for arg in argv:
            if arg == "--":
                break  # what follows is positional
            name = arg.split("=", 1)[0]
            if not name.startswith("--") or name in known:
                continue
            if self.allow_abbrev and any(option.startswith(name) for option in known):
                continue  # argparse takes (or, when ambiguous, refuses) the abbreviation itself
            found.append(arg)
        return found
