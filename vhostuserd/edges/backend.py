"""A running backend: what the daemon knows of one process it supervises (`supervisor`), from
its spawn or its re-adoption (`readopt`) to its exit; its life cycle, its output so far and its
share of the daemon's log."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from vhostuserd.core.lifecycle import Lifecycle
from vhostuserd.edges.cgroup import Usage
from vhostuserd.edges.lograte import LOG_BURST, LOG_LINES_PER_S, Bucket


@dataclass
class Backend:
    id: str
    descriptor: str
    binary: str
    argv: tuple[str, ...]
    pid: int
    owner: str
    owner_uid: int
    detached: bool
    started_at: int  # microseconds since the epoch
    start_time: int  # /proc/PID/stat starttime, for re-adoption
    exe: str
    life: Lifecycle  # its state (`core.lifecycle`), shared with the processes that respawn it
    log_pipe: str = ""  # "pipe:[inode]" of the daemon's own read end, recorded at spawn
    cgroup: str = ""  # its own cgroup v2 directory (absolute), "" without cgroups
    usage: Usage = field(default_factory=Usage, repr=False)  # what it consumed, final once exited
    adopted: bool = False
    exit_status: int = -1
    exit_signal: int = -1
    log: bytearray = field(default_factory=bytearray, repr=False)
    out_fd: int = field(default=-1, repr=False)
    pidfd: int = field(default=-1, repr=False)  # held from spawn (or re-adoption) to exit
    exited: asyncio.Future[int] | None = field(default=None, repr=False)
    _partial: bytes = field(default=b"", repr=False)
    _stopping: asyncio.Task[None] | None = field(default=None, repr=False)
    _lines: Bucket = field(default_factory=lambda: Bucket(LOG_LINES_PER_S, LOG_BURST), repr=False)
    _suppressed: int = field(default=0, repr=False)
    _window: float = field(default=0.0, repr=False)
    _window_bytes: int = field(default=0, repr=False)

    def record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "descriptor": self.descriptor,
            "binary": self.binary,
            "argv": list(self.argv),
            "pid": self.pid,
            "owner": self.owner,
            "owner_uid": self.owner_uid,
            "detached": self.detached,
            "started_at": self.started_at,
            "start_time": self.start_time,
            "exe": self.exe,
            "log_pipe": self.log_pipe,
            "cgroup": self.cgroup,
        }
