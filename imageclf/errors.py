"""Errors that carry a message meant for the user, not a traceback."""


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
