"""Reading the files of an image folder that nobody vouches for.

A training folder may be shared or uploaded, and ``retrain.py --watch`` reads it unattended, so
retrain.py, fine-tuning and the Beam job (bottlenecks_job.py) all read its files through here,
under the same rules:

- **Nothing outside ``--image_dir`` through a symlink** (unless ``--follow_symlinks``): a file
  is opened one path component at a time without following links (paths.open_confined), links
  are resolved against the folder, and one that leads out is refused before anything behind it
  is opened. A file swapped for a link after it was listed cannot lead out either.
- **Only regular files, at most ``--max_file_mb``**, known from the open descriptor before a
  byte is read (and checked again while reading, in case the file grows).
- **The header first**: the first bytes must be those of a format we decode (Pillow's own
  checks) before the rest is read.
- **One read per use**: a content hash is computed in chunks; bytes to decode are read once and
  the hash that keys their cache entry is computed from those very bytes, so a file changed
  between hashing and decoding never files one content's vector under another's hash.

Paths with a scheme (``gs://``, ``ram://``) are read through ``tf.io.gfile``; object stores have
no symlinks, and the size and header rules apply as they do locally.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

from imageclf.errors import (
    BadImageError,
    FileTooLargeError,
    NotAnImageError,
    OutsideRootError,
    UnreadableFileError,
)
from imageclf.images import HEADER_BYTES, looks_like_image
from imageclf.paths import PathError, PathEscapeError, PathForbiddenError, PathNotFoundError, open_confined

#: Default of --max_file_mb: a 12 MP phone JPEG is 2-5 MB, a 40 MP PNG rarely over 50.
DEFAULT_MAX_FILE_MB = 50
MIB = 1 << 20
_CHUNK = 1 << 20  # bytes hashed per read: memory stays flat whatever the file's size

FOLLOW_HINT = "--follow_symlinks allows it"


@dataclass(frozen=True)
class FileRules:
    """How files are read. ``root`` is ``--image_dir``: with it (and without ``follow_symlinks``)
    no symlink leads a read outside it. Picklable, so Beam workers get the driver's rules."""

    root: str | None = None
    max_bytes: int = DEFAULT_MAX_FILE_MB * MIB
    follow_symlinks: bool = False

    @property
    def confined(self) -> bool:
        return self.root is not None and not self.follow_symlinks and not is_url(self.root)


def is_url(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def content_key(path: str | os.PathLike, rules: FileRules) -> str:
    """SHA-256 of a file's bytes, read in chunks after its size and header passed the rules.

    Raises BadImageError (a subclass saying why) for a file that is not read.
    """
    digest = hashlib.sha256()
    with _opened(path, rules) as (f, header):
        digest.update(header)
        total = len(header)
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            total += len(chunk)
            if total > rules.max_bytes:  # it grew since its size was checked
                raise _too_large(path, total, rules)
            digest.update(chunk)
    return digest.hexdigest()


def read_image_bytes(path: str | os.PathLike, rules: FileRules) -> tuple[str, bytes]:
    """(SHA-256, bytes) of a file: read once, at most ``rules.max_bytes``, hashed from what was read."""
    with _opened(path, rules) as (f, header):
        data = header + f.read(rules.max_bytes + 1 - len(header))
    if len(data) > rules.max_bytes:
        raise _too_large(path, len(data), rules)
    return hashlib.sha256(data).hexdigest(), data


@contextmanager
def _opened(path: str | os.PathLike, rules: FileRules) -> Iterator[tuple[BinaryIO, bytes]]:
    """The open file, positioned after its header, and the header; only once both passed."""
    f, size = _open_url(path) if is_url(path) else _open_local(path, rules)
    with f, _read_errors(path):
        if size > rules.max_bytes:
            raise _too_large(path, size, rules)
        header = f.read(HEADER_BYTES)
        if not header:
            raise BadImageError(f"{path}: empty file")
        if not looks_like_image(header):
            raise NotAnImageError(f"{path}: not an image (unrecognised content)")
        yield f, header


@contextmanager
def _read_errors(path: str | os.PathLike) -> Iterator[None]:
    """A failure while reading (a disk error, an object gone mid-read) as UnreadableFileError."""
    try:
        yield
    except OSError as e:
        raise UnreadableFileError(f"{path}: cannot read file ({e.strerror or type(e).__name__})") from None
    except Exception as e:
        if not is_url(path):
            raise
        import tensorflow as tf

        if isinstance(e, tf.errors.OpError):
            raise UnreadableFileError(f"{path}: cannot read file ({gfile_reason(e)})") from None
        raise


def _open_local(path: str | os.PathLike, rules: FileRules) -> tuple[BinaryIO, int]:
    fd = _confined_fd(path, rules) if rules.confined else _plain_fd(path)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnreadableFileError(f"{path}: not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb"), info.st_size


def _confined_fd(path: str | os.PathLike, rules: FileRules) -> int:
    relative = os.path.relpath(path, rules.root)
    try:
        return open_confined(rules.root, relative)
    except PathEscapeError:
        raise OutsideRootError(f"{path}: a symlink leads outside --image_dir; not read ({FOLLOW_HINT})") from None
    except PathNotFoundError:
        raise UnreadableFileError(f"{path}: cannot read file (No such file or directory)") from None
    except PathForbiddenError:
        raise UnreadableFileError(f"{path}: cannot read file (Permission denied)") from None
    except PathError as e:
        detail = str(e).rpartition("': ")[2] if "': " in str(e) else str(e)
        raise UnreadableFileError(f"{path}: cannot read file ({detail})") from None


def _plain_fd(path: str | os.PathLike) -> int:
    # O_NONBLOCK: a FIFO opens at once (and is then refused as not a regular file) instead of hanging.
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise UnreadableFileError(f"{path}: cannot read file ({e.strerror or type(e).__name__})") from None
    except ValueError as e:  # a NUL byte in the path
        raise UnreadableFileError(f"{path!r}: cannot read file ({e})") from None


def _open_url(path: str | os.PathLike) -> tuple[BinaryIO, int]:
    import tensorflow as tf

    try:
        size = tf.io.gfile.stat(str(path)).length
        return tf.io.gfile.GFile(str(path), "rb"), size
    except tf.errors.OpError as e:
        raise UnreadableFileError(f"{path}: cannot read file ({gfile_reason(e)})") from None


def gfile_reason(error) -> str:
    """The strerror-like part of a tf.io.gfile error ("PATH; No such file or directory")."""
    return error.message.rpartition("; ")[2] or type(error).__name__


def _too_large(path: str | os.PathLike, size: int, rules: FileRules) -> FileTooLargeError:
    return FileTooLargeError(f"{path}: {size:,} bytes is over the limit of {rules.max_bytes / MIB:g} MiB "
                             "(--max_file_mb); not read")
