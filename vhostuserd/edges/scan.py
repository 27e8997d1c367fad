"""Reading the descriptor directories: the file-system edge of the lookup.

Owns rule 1 (what counts as a candidate) and turns every way a file can be unusable
(dangling or looping symlink, unreadable, not a regular file, over 1 MiB, invalid UTF-8)
into a diagnostic, never an exception. A `FileCache` lets the live index re-read only the
files whose identity changed.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field

from vhostuserd.core.descriptors import (
    ERROR,
    MASKED,
    MAX_DESCRIPTOR_SIZE,
    WARNING,
    Diagnostic,
    Parsed,
    broken,
    parse_descriptor,
)
from vhostuserd.core.lookup import Directory, Listing

Identity = tuple[int, int, int, int, int]
_DEV_NULL = os.makedev(1, 3)


def is_candidate_name(name: str) -> bool:
    """Rule 1: ``*.json`` directly in the directory, not hidden (editor and atomic-write
    temporaries)."""
    return name.endswith(".json") and not name.startswith(".") and len(name) > len(".json")


def _identity(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _stat_error(path: str, e: OSError) -> str:
    if e.errno == errno.ENOENT:
        return "dangling symlink: its target does not exist"
    if e.errno == errno.ELOOP:
        return "symlink loop: too many levels of symbolic links"
    if e.errno == errno.EACCES:
        return "cannot be accessed: permission denied"
    return f"cannot be accessed: {e.strerror}"


def _read(path: str, st: os.stat_result) -> bytes | str:
    """Read at most 1 MiB + 1 bytes; a string is the reason it could not be read."""
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_size > MAX_DESCRIPTOR_SIZE:
        return f"larger than {MAX_DESCRIPTOR_SIZE} bytes ({st.st_size})"
    try:
        # O_NONBLOCK: the file may have been swapped for a FIFO since the stat.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        return (
            _stat_error(path, e) if e.errno != errno.EACCES else "cannot be read: permission denied"
        )
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "not a regular file"
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_DESCRIPTOR_SIZE:
            chunk = os.read(fd, MAX_DESCRIPTOR_SIZE + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_DESCRIPTOR_SIZE:
            return f"larger than {MAX_DESCRIPTOR_SIZE} bytes"
        return b"".join(chunks)
    except OSError as e:
        return f"cannot be read: {e.strerror}"
    finally:
        os.close(fd)


def read_candidate(path: str, name: str, tier: str) -> tuple[Parsed | None, Identity | None]:
    """Read one candidate. ``(None, _)`` means it is not a candidate: gone, or a directory."""
    try:
        st = os.stat(path)
    except OSError as e:
        try:
            os.lstat(path)
        except OSError:
            return None, None  # not there at all (deleted since it was listed)
        return broken(path, _stat_error(path, e)), None
    if stat.S_ISDIR(st.st_mode):
        return None, None
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == _DEV_NULL:
        # A symlink to /dev/null masks, as it does for systemd units: it is empty.
        return MASKED, _identity(st)
    data = _read(path, st)
    if isinstance(data, str):
        return broken(path, data), _identity(st)
    return parse_descriptor(data, path=path, name=name, tier=tier), _identity(st)


@dataclass
class FileCache:
    """path -> (identity, outcome); a file is re-read only when its identity changes."""

    entries: dict[str, tuple[Identity, Parsed | None]] = field(default_factory=dict)

    def get(self, path: str, name: str, tier: str) -> Parsed | None:
        cached = self.entries.get(path)
        if cached is not None:
            try:
                st = os.stat(path)
            except OSError:
                st = None
            if st is not None and _identity(st) == cached[0]:
                return cached[1]
        parsed, ident = read_candidate(path, name, tier)
        if ident is not None:
            self.entries[path] = (ident, parsed)
        else:
            self.entries.pop(path, None)
        return parsed

    def forget_missing(self, live: set[str]) -> None:
        for path in [p for p in self.entries if p not in live]:
            del self.entries[path]


def list_directory(directory: Directory, cache: FileCache | None = None) -> Listing:
    """Read one directory of the search path. A missing directory is simply empty."""
    try:
        names = os.listdir(directory.path)
    except FileNotFoundError:
        return Listing(directory, {})
    except NotADirectoryError:
        return Listing(
            directory, {}, (Diagnostic(directory.path, WARNING, "is not a directory; ignored"),)
        )
    except OSError as e:
        return Listing(
            directory, {}, (Diagnostic(directory.path, ERROR, f"cannot be listed: {e.strerror}"),)
        )
    entries: dict[str, Parsed] = {}
    for name in names:
        if not is_candidate_name(name):
            continue
        path = f"{directory.path}/{name}"
        parsed = (
            cache.get(path, name, directory.tier)
            if cache is not None
            else read_candidate(path, name, directory.tier)[0]
        )
        if parsed is not None:
            entries[name] = parsed
    return Listing(directory, entries)


def list_all(dirs: Sequence[Directory], cache: FileCache | None = None) -> list[Listing]:
    return [list_directory(d, cache) for d in dirs]
