"""The lookup without a daemon: what ``vhostuserctl --offline`` and ``check`` run in-process.

Wires the edges (`scan`, `capabilities`) to the core (`lookup`, `resolve`) once, for one
command, the same way the live index does continuously.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vhostuserd.core.descriptors import Descriptor, Parsed, ProbeResult
from vhostuserd.core.fields import DescriptorInfo
from vhostuserd.core.lookup import Directory, Listing, LookupResult, merge, search_path
from vhostuserd.core.resolve import Resolution, resolve
from vhostuserd.edges import procs, scan
from vhostuserd.edges.probe import ProbeCache
from vhostuserd.edges.procs import describe_status as describe_status
from vhostuserd.edges.procs import status_text as status_text


def read_file(path: str) -> Parsed | None:
    """One candidate file as ``check`` names it (None: a directory, or no file at all)."""
    parsed, _ = scan.read_candidate(path, os.path.basename(path), "check")
    return parsed


def list_all(dirs: Sequence[Directory]) -> list[Listing]:
    """Every tier directory listed, most specific first."""
    return scan.list_all(dirs)


def default_search_path(*, system: bool, sysconfdir: str = "/etc") -> tuple[Directory, ...]:
    env = os.environ
    return search_path(
        system=system,
        sysconfdir=sysconfdir,
        xdg_data_dirs=env.get("XDG_DATA_DIRS"),
        xdg_config_home=env.get("XDG_CONFIG_HOME"),
        home=env.get("HOME"),
    )


def descriptor_dict(d: Descriptor, caps: ProbeResult | None) -> dict[str, Any]:
    """The Descriptor object of docs/json.md, as the daemon's would be (``object`` null:
    offline, there is no D-Bus object)."""
    return DescriptorInfo.of(d, caps, None).as_dict()


def run_with_socket(
    loop: asyncio.AbstractEventLoop, argv: Sequence[str], sock: int
) -> tuple[int, asyncio.Future[int]]:
    """``vhostuserctl spawn --exec``: start ``argv`` in our session with our stdio and ``sock``
    as fd 3; its pid, and its wait status once it exits. Raises OSError when the exec fails."""
    reaper = procs.Reaper(loop)
    reaper.install()
    pid = procs.spawn(
        argv, fds={0: 0, 1: 1, 2: 2, 3: sock}, env=dict(os.environ), new_session=False
    )
    return pid, reaper.watch(pid)


@dataclass
class OfflineLookup:
    """One resolution of the search path, with probing on demand."""

    dirs: tuple[Directory, ...]
    probe_timeout: float = 5.0

    def __post_init__(self) -> None:
        self.listings = scan.list_all(self.dirs)
        self.result: LookupResult = merge(self.listings)

    async def _probe_all(self, descriptors: Sequence[Descriptor]) -> list[ProbeResult]:
        reaper = procs.Reaper(asyncio.get_running_loop())
        reaper.install()
        try:
            cache = ProbeCache(reaper, self.probe_timeout)
            return list(await asyncio.gather(*(self._caps(cache, d) for d in descriptors)))
        finally:
            reaper.uninstall()

    @staticmethod
    async def _caps(cache: ProbeCache, d: Descriptor) -> ProbeResult:
        """An adapter's static capabilities (`adapters`: never probed), else the probe's."""
        static = d.static_capabilities
        return static if static is not None else await cache.get(d.binary, d.type)

    def probe_each(self, descriptors: Sequence[Descriptor]) -> list[ProbeResult]:
        """One result per descriptor, in order (two may share a name: files of different tiers)."""
        if not descriptors:
            return []
        return asyncio.run(self._probe_all(descriptors))

    def probe(self, descriptors: Sequence[Descriptor]) -> dict[str, ProbeResult]:
        """The results by descriptor name (for effective descriptors, whose names are unique)."""
        return {d.name: r for d, r in zip(descriptors, self.probe_each(descriptors), strict=True)}

    def resolve(
        self, btype: str, features: Sequence[str]
    ) -> tuple[Resolution, dict[str, ProbeResult]]:
        candidates = [d for d in self.result.descriptors if d.type == btype] if features else []
        probed = self.probe(candidates)
        return resolve(
            self.result.descriptors, btype, features, lambda d: probed.get(d.name)
        ), probed
