"""The tier merge of docs/contract.md section 1: directory contents in, effective ordered list out.

Owns the search path (which directories, in which order) and rules 2-5: override by
basename, zero-length masking, broken files that shadow and are diagnosed, byte-order
sort. Pure: callers (`scan`, `index`) read the directories and hand their contents here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from vhostuserd.core.descriptors import Descriptor, Diagnostic, Parsed

SUBDIR = "qemu/vhost-user"
DEFAULT_DATA_DIRS = "/usr/local/share:/usr/share"


@dataclass(frozen=True, slots=True)
class Directory:
    """One directory of the search path and the tier it belongs to."""

    tier: str
    path: str


@dataclass(frozen=True, slots=True)
class Listing:
    """What one directory contains: candidate basename -> what the file amounts to."""

    directory: Directory
    entries: Mapping[str, Parsed]
    diagnostics: tuple[Diagnostic, ...] = ()


@dataclass(frozen=True, slots=True)
class LookupResult:
    """The effective index: descriptors sorted by rule 5, and everything worth reporting."""

    descriptors: tuple[Descriptor, ...]
    diagnostics: tuple[Diagnostic, ...]

    def by_name(self, name: str) -> Descriptor | None:
        for d in self.descriptors:
            if d.name == name:
                return d
        return None


def _absolute_dirs(value: str | None, default: str) -> list[str]:
    # XDG: an unset or empty variable means the default; relative entries are ignored.
    entries = [p for p in (value or "").split(":") if p.startswith("/")]
    return entries or default.split(":")


def search_path(
    *,
    system: bool,
    sysconfdir: str,
    xdg_data_dirs: str | None,
    xdg_config_home: str | None,
    home: str | None,
) -> tuple[Directory, ...]:
    """The directories to read, most specific first (the order of the SearchPath property).

    The user tier exists only when not ``system``: the system service must never run a
    binary an unprivileged user named.
    """
    dirs: list[Directory] = []
    if not system:
        config_home = xdg_config_home if (xdg_config_home or "").startswith("/") else None
        if config_home is None and home:
            config_home = home.rstrip("/") + "/.config"
        if config_home:
            dirs.append(Directory("user", f"{config_home.rstrip('/')}/{SUBDIR}"))
    dirs.append(Directory("sysconf", f"{sysconfdir.rstrip('/') or ''}/{SUBDIR}"))
    seen: set[str] = set()
    for data_dir in _absolute_dirs(xdg_data_dirs, DEFAULT_DATA_DIRS):
        path = f"{data_dir.rstrip('/')}/{SUBDIR}"
        if path not in seen:
            seen.add(path)
            dirs.append(Directory("data", path))
    return tuple(dirs)


def sort_key(name: str) -> bytes:
    """Rule 5: byte order of the file name as it is on disk."""
    return name.encode("utf-8", "surrogateescape")


def merge(listings: Sequence[Listing]) -> LookupResult:
    """Apply rules 2-5 to the listings, given most specific first."""
    winners: dict[str, Parsed] = {}
    for listing in listings:
        for name, parsed in listing.entries.items():
            winners.setdefault(name, parsed)
    descriptors: list[Descriptor] = []
    diagnostics: list[Diagnostic] = []
    for listing in listings:
        diagnostics.extend(listing.diagnostics)
    for name in sorted(winners, key=sort_key):
        parsed = winners[name]
        diagnostics.extend(parsed.diagnostics)
        if parsed.descriptor is not None:
            descriptors.append(parsed.descriptor)
    return LookupResult(tuple(descriptors), tuple(diagnostics))


def shadowed(listings: Sequence[Listing]) -> Iterable[tuple[str, str]]:
    """(shadowed path, path that wins) for every candidate that loses to a more specific one."""
    first: dict[str, str] = {}
    for listing in listings:
        for name in listing.entries:
            path = f"{listing.directory.path}/{name}"
            if name in first:
                yield path, first[name]
            else:
                first[name] = path
