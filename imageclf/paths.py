"""Confining user-given paths to one root folder."""

from __future__ import annotations

from pathlib import Path


class PathEscapeError(PermissionError):
    """The path points outside the configured root (``..``, absolute elsewhere, symlink out)."""


def confined(root: str | Path, user_path: str) -> Path:
    """``user_path`` resolved under ``root``; raises PathEscapeError if it leaves the root.

    Symlinks are resolved first, so a link inside the root that points outside is refused too.
    """
    base = Path(root).resolve()
    if "\x00" in user_path:
        raise PathEscapeError("path contains a NUL byte")
    candidate = (base / user_path).resolve()
    if candidate != base and base not in candidate.parents:
        raise PathEscapeError(f"'{user_path}' is outside the image root")
    return candidate
