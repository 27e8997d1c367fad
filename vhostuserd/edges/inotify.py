"""inotify(7) through ctypes: the three system calls and the event records, nothing more.

An edge module (no policy): `Inotify` owns one non-blocking, close-on-exec inotify fd;
`read` drains every queued event without blocking, so the caller can read it from an
event loop (``loop.add_reader``) with no thread and no timer. Names are kept as bytes:
the caller decides how to decode them (the index uses ``os.fsdecode``, which keeps bytes
that are not UTF-8 as lone surrogates).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from dataclasses import dataclass
from typing import Self

# <sys/inotify.h>
IN_ACCESS = 0x00000001
IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_CLOSE_NOWRITE = 0x00000010
IN_OPEN = 0x00000020
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_MASK_ADD = 0x20000000
IN_ISDIR = 0x40000000
IN_CLOEXEC = os.O_CLOEXEC
IN_NONBLOCK = os.O_NONBLOCK

_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len (struct inotify_event)
# Enough for at least one event with the longest name (NAME_MAX 255 + NUL), and for a
# few hundred ordinary ones per read(2).
_READ_SIZE = 64 * 1024

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_init1 = _libc.inotify_init1
_init1.argtypes = [ctypes.c_int]
_init1.restype = ctypes.c_int
_add_watch = _libc.inotify_add_watch
_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_add_watch.restype = ctypes.c_int
_rm_watch = _libc.inotify_rm_watch
_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
_rm_watch.restype = ctypes.c_int


def _oserror(what: str, path: str | bytes | None = None) -> OSError:
    e = ctypes.get_errno()
    if path is None:
        return OSError(e, f"{what}: {os.strerror(e)}")
    return OSError(e, os.strerror(e), os.fsdecode(path))


@dataclass(frozen=True, slots=True)
class Event:
    """One ``struct inotify_event``; ``name`` is empty for events on the watched object."""

    wd: int
    mask: int
    cookie: int
    name: bytes


def parse(data: bytes) -> list[Event]:
    """The events in one buffer returned by read(2) on an inotify fd."""
    events = []
    offset, end = 0, len(data)
    while offset + _HEADER.size <= end:
        wd, mask, cookie, length = _HEADER.unpack_from(data, offset)
        offset += _HEADER.size
        name = data[offset : offset + length].split(b"\0", 1)[0]
        offset += length
        events.append(Event(wd, mask, cookie, name))
    return events


class Inotify:
    """One inotify instance: a non-blocking, close-on-exec fd."""

    def __init__(self) -> None:
        fd = int(_init1(IN_NONBLOCK | IN_CLOEXEC))
        if fd < 0:
            raise _oserror("inotify_init1")
        self.fd: int = fd

    def fileno(self) -> int:
        return self.fd

    def add_watch(self, path: str | bytes, mask: int) -> int:
        """Watch ``path`` (or change the mask of its existing watch); returns its wd."""
        wd = _add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            raise _oserror("inotify_add_watch", path)
        return int(wd)

    def rm_watch(self, wd: int) -> None:
        """Remove a watch; one the kernel already dropped (its object is gone) is no error."""
        if _rm_watch(self.fd, wd) < 0 and ctypes.get_errno() != errno.EINVAL:
            raise _oserror("inotify_rm_watch")

    def read(self) -> list[Event]:
        """Every event queued now, without blocking (an empty list when there is none)."""
        events: list[Event] = []
        while True:
            try:
                data = os.read(self.fd, _READ_SIZE)
            except BlockingIOError:
                return events
            except InterruptedError:
                continue
            events.extend(parse(data))
            if len(data) < _READ_SIZE - (_HEADER.size + 256):
                return events  # the queue is drained: save the read(2) that says EAGAIN

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
