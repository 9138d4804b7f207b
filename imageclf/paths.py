"""Reading user-named files without ever leaving one root folder.

Checking a path and then opening it are two steps, and a file swapped for a symlink between
them escapes any check. So nothing here asks the kernel to follow a link: the path is walked
one component at a time with ``openat(..., O_NOFOLLOW)`` from a descriptor of the root, and a
symlink met on the way is read and resolved by this code, against the root, the way the
kernel would (``..`` included). What is opened is what was checked.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import deque
from pathlib import Path

from imageclf.errors import ServingError, echo

#: Symlinks followed in one lookup before giving up, as Linux does (ELOOP).
MAX_SYMLINKS = 40


class PathError(OSError, ServingError):
    """A user-given path that cannot be read; as a ``ServingError``, the service's answer to it."""

    kind, http_status, grpc_code = "bad_path", 400, "INVALID_ARGUMENT"


class PathEscapeError(PathError, PermissionError):
    """The path points outside the root (``..``, absolute elsewhere, a symlink out)."""

    kind, http_status, grpc_code = "forbidden_path", 403, "PERMISSION_DENIED"


class PathNotFoundError(PathError, FileNotFoundError):
    kind, http_status, grpc_code = "file_not_found", 404, "NOT_FOUND"


class PathForbiddenError(PathError, PermissionError):
    """The file exists but the service may not read it."""

    kind, http_status, grpc_code = "forbidden_path", 403, "PERMISSION_DENIED"


class FileTooLargeError(PathError):
    kind, http_status = "too_large", 413


def read_confined(root: str | Path, user_path: str, max_bytes: int) -> bytes:
    """The bytes of the regular file ``user_path`` under ``root``, at most ``max_bytes`` of them."""
    fd = open_confined(root, user_path)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise PathNotFoundError(f"'{echo(user_path)}' is not a file")
        if info.st_size > max_bytes:
            raise FileTooLargeError(f"'{echo(user_path)}' is over the {max_bytes:,} byte limit")
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # it grew after the fstat
        raise FileTooLargeError(f"'{echo(user_path)}' is over the {max_bytes:,} byte limit")
    return data


def open_confined(root: str | Path, user_path: str) -> int:
    """A read-only descriptor of ``user_path`` resolved under ``root``; the caller closes it."""
    if "\x00" in user_path:
        raise PathError("the path contains a NUL byte")
    shown = echo(user_path)  # how messages quote it: a client's path may be very long
    base = os.path.realpath(root)
    pending = deque(_parts_under(base, user_path, shown))
    dirs = [os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)]  # root first, then each subfolder
    links = 0
    try:
        while pending:
            part = pending.popleft()
            if part in ("", "."):
                continue
            if part == "..":
                if len(dirs) == 1:
                    raise PathEscapeError(f"'{shown}' is outside the image root")
                os.close(dirs.pop())
                continue
            target = _readlink(part, dirs[-1], shown)
            if target is not None:
                links += 1
                if links > MAX_SYMLINKS:
                    raise PathError(f"'{shown}': too many levels of symbolic links")
                if os.path.isabs(target):
                    while len(dirs) > 1:
                        os.close(dirs.pop())
                pending.extendleft(reversed(_parts_under(base, target, shown)))
                continue
            fd = _open_at(part, dirs[-1], shown, directory=bool(pending))
            if pending:
                dirs.append(fd)
            else:
                return fd
        return os.dup(dirs[-1])  # the path named a folder (the root itself, or "a/..")
    finally:
        for fd in dirs:
            os.close(fd)


def _parts_under(base: str, path: str, user_path: str | None = None) -> list[str]:
    """``path`` as components relative to ``base``; an absolute path must lie inside it."""
    if os.path.isabs(path):
        inside = os.path.normpath(path)
        if inside != base and not inside.startswith(base.rstrip("/") + "/"):
            raise PathEscapeError(f"'{user_path or echo(path)}' is outside the image root")
        path = inside[len(base):]
    return path.split("/")


def _readlink(name: str, dir_fd: int, user_path: str) -> str | None:
    """The link's target if ``name`` is a symlink in ``dir_fd``, else None."""
    try:
        return os.readlink(name, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.EINVAL:  # exists and is not a link
            return None
        raise _path_error(e, user_path) from None


def _open_at(name: str, dir_fd: int, user_path: str, directory: bool) -> int:
    # O_NOFOLLOW: if the entry became a symlink since _readlink looked, refuse rather than follow.
    # O_NONBLOCK: opening a FIFO must not hang a request thread.
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | (os.O_DIRECTORY if directory else 0)
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise PathError(f"'{user_path}' changed while it was being opened; try again") from None
        raise _path_error(e, user_path) from None


def _path_error(e: OSError, user_path: str) -> PathError:
    if e.errno in (errno.ENOENT, errno.ENOTDIR):
        return PathNotFoundError(f"no such file under the image root: '{user_path}'")
    if e.errno in (errno.EACCES, errno.EPERM):
        return PathForbiddenError(f"'{user_path}': permission denied")
    if e.errno == errno.ENAMETOOLONG:
        return PathError("the file name is too long")
    return PathError(f"'{user_path}': {e.strerror}")
