"""Whether this imageclf is installed (``pip install .``) or run from a clone, for the Python child
processes it starts (Beam's local workers, the LiteRT converter), which must import this very code."""

from __future__ import annotations

import os
import site
from collections.abc import Mapping
from pathlib import Path

#: The folder holding the imageclf package: site-packages when installed, else the clone's root.
PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def installed() -> bool:
    """True when imageclf lives in one of this Python's site-packages folders, where any child finds it."""
    folders = [*site.getsitepackages(), site.getusersitepackages()]
    return PACKAGE_ROOT in {Path(folder).resolve() for folder in folders}


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) for a child Python that imports imageclf: as it is when the package
    is installed; from a clone, with the clone's root first on PYTHONPATH, so that the child imports the
    clone's code from any working folder (``python retrain.py`` and ``python -m service`` need no install)."""
    env = dict(os.environ if env is None else env)
    if installed():
        return env
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(PACKAGE_ROOT)]
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT), *paths])
    return env
