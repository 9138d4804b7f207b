"""Which files were opened, asked of the kernel (inotify): for tests that a file is never opened."""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path


class OpenWatch:
    """Every open of a file or folder directly inside the watched folders, by any process (inotify)."""

    IN_OPEN, IN_ACCESS, IN_NONBLOCK = 0x20, 0x01, os.O_NONBLOCK

    def __init__(self, *folders: Path):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(self.IN_NONBLOCK)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        self.names = {}
        for folder in folders:
            wd = self.libc.inotify_add_watch(self.fd, str(folder).encode(), self.IN_OPEN | self.IN_ACCESS)
            assert wd >= 0, os.strerror(ctypes.get_errno())
            self.names[wd] = folder

    def events(self) -> list[str]:
        found = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return found
            offset = 0
            while offset < len(data):
                wd, _, _, length = struct.unpack_from("iIII", data, offset)
                name = data[offset + 16:offset + 16 + length].rstrip(b"\0").decode()
                found.append(str(self.names[wd] / name))
                offset += 16 + length

    def close(self) -> None:
        os.close(self.fd)
