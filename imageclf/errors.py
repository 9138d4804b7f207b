"""Errors that carry a message meant for the user, not a traceback."""

from __future__ import annotations

from collections.abc import Iterable

#: The most characters of one client value (a model name, a path...) that an error message quotes.
ECHO_CHARS = 100
#: The most values of a client's list (input keys, output names...) that an error message quotes.
ECHO_ITEMS = 5


def echo(value: object, limit: int = ECHO_CHARS) -> str:
    """A client's value as an error message may quote it: cut to ``limit`` characters.

    Errors go back in JSON and in gRPC trailers, which clients refuse past 8-16 KB of metadata:
    a 100 KB model name must not come back whole. The cut says how long the value was.
    """
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def echo_list(values: Iterable[object]) -> str:
    """A client's list of values for an error message: at most ECHO_ITEMS of them, each cut by ``echo``."""
    values = list(values)
    shown = [echo(v) for v in values[:ECHO_ITEMS]]
    more = f" and {len(values) - ECHO_ITEMS:,} more" if len(values) > ECHO_ITEMS else ""
    return f"[{', '.join(repr(v) for v in shown)}]{more}"


class UserError(Exception):
    """A problem with the user's input or flags; command-line tools exit with status 2."""


class BadImageError(UserError):
    """A file or upload that cannot be used as an image (empty, corrupt, too large...).

    ``reason`` is the short kind of problem, shared by every file skipped for it: a retrain's
    summary counts skipped files by reason.
    """

    reason = "empty, truncated or corrupt"


class NotAnImageError(BadImageError):
    """Content that no image decoder recognises (a text file, a PDF...)."""

    reason = "not an image"


class ImageTooLargeError(BadImageError):
    """An image whose pixel count is over the configured limit (decompression bombs)."""

    reason = "too many pixels"


class UnreadableFileError(BadImageError):
    """A file that cannot be opened or read (gone, no permission, not a regular file)."""

    reason = "cannot be read"


class FileTooLargeError(BadImageError):
    """A file over the size limit; refused from its size, before its content is read."""

    reason = "file over the size limit"


class OutsideRootError(BadImageError):
    """A path that leads outside the folder being read, through a symlink; never opened."""

    reason = "symlink leading outside --image_dir"
