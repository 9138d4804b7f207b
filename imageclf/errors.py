"""Errors that carry a message meant for the user, not a traceback."""


class UserError(Exception):
    """A problem with the user's input or flags; command-line tools exit with status 2."""


class BadImageError(UserError):
    """A file or upload that cannot be used as an image (empty, corrupt, too large...)."""


class NotAnImageError(BadImageError):
    """Content that no image decoder recognises (a text file, a PDF...)."""


class ImageTooLargeError(BadImageError):
    """An image whose pixel count is over the configured limit (decompression bombs)."""
