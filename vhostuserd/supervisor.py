"""Running backends: start, watch, log, stop, record and re-adopt them. The process edge
of Spawn, with no D-Bus in it.

Owns each backend's life: started by `procs.spawn` in its own session with the socket as
fd 3, stdout/stderr into a pipe read on the event loop (the last 64 KiB kept, each line
logged with the backend's id), its exit seen through a pidfd (no thread per backend),
stopped with SIGTERM to its process group and SIGKILL when the grace period runs out.
Each running backend has a small state file, so a restarted daemon (even after SIGKILL)
re-adopts those still alive with the same pid, start time and executable.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import procs
from .authority import SETPRIV

log = logging.getLogger("vhostuserd.supervisor")

LOG_KEEP = 64 * 1024
LINE_MAX = 1024
RUNNING, STOPPING, EXITED = "running", "stopping", "exited"
ID_BLOCK = 64


class SpawnError(Exception):
    """The backend could not be started or died at once; the message says how."""


def _proc_start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return int(fields[19])  # field 22, starttime, counted after "pid (comm)"


def _proc_start_epoch(pid: int) -> float | None:
    """When ``pid`` started, in seconds since the epoch (boot time + its start ticks)."""
    ticks = _proc_start_time(pid)
    if ticks is None:
        return None
    try:
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, StopIteration, ValueError):
        return None
    return btime + ticks / os.sysconf("SC_CLK_TCK")


def _proc_exe(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def _fd_target(pid: int, fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None


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
    log_pipe: str = ""  # "pipe:[inode]" of the backend's stdout, for re-adoption
    adopted: bool = False
    state: str = RUNNING
    exit_status: int = -1
    exit_signal: int = -1
    log: bytearray = field(default_factory=bytearray, repr=False)
    out_fd: int = field(default=-1, repr=False)
    exited: asyncio.Future[int] | None = field(default=None, repr=False)
    _partial: bytes = field(default=b"", repr=False)
    _stopping: asyncio.Task[None] | None = field(default=None, repr=False)

    def record(self) -> dict[str, Any]:
        return {
            "id": self.id, "descriptor": self.descriptor, "binary": self.binary, "argv": list(self.argv),
            "pid": self.pid, "owner": self.owner, "owner_uid": self.owner_uid, "detached": self.detached,
            "started_at": self.started_at, "start_time": self.start_time, "exe": self.exe,
            "log_pipe": self.log_pipe,
        }


class Supervisor:
    """All backends of this daemon. ``on_change(backend, what)`` reports "state" and "exited"."""

    def __init__(
        self,
        reaper: procs.Reaper,
        state_dir: str,
        grace_period: float,
        on_change: Callable[[Backend, str], None],
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.reaper = reaper
        self.state_dir = state_dir
        self.grace_period = grace_period
        self.on_change = on_change
        self.backends: dict[str, Backend] = {}
        self._id_next = 0
        self._id_reserved = 0
        os.makedirs(state_dir, mode=0o700, exist_ok=True)

    # ---- ids and records

    def _next_id(self) -> str:
        """Ids are never reused, across restarts too: the state dir holds a bound that the
        daemon reserves ids below, a block at a time (so a spawn rarely writes it)."""
        if self._id_next >= self._id_reserved:
            path = os.path.join(self.state_dir, "next-id")
            if self._id_reserved == 0:
                try:
                    with open(path) as f:
                        self._id_next = max(1, int(f.read().strip() or "1"))
                except (OSError, ValueError):
                    self._id_next = 1
                self._id_next = max(self._id_next, *(int(i) + 1 for i in self.backends if i.isdigit()), 1)
            self._id_reserved = self._id_next + ID_BLOCK
            self._write_atomic(path, f"{self._id_reserved}\n")
        n = self._id_next
        self._id_next += 1
        return str(n)

    def _write_atomic(self, path: str, text: str) -> None:
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)

    def _record_path(self, backend_id: str) -> str:
        return os.path.join(self.state_dir, f"backend-{backend_id}.json")

    def _save(self, b: Backend) -> None:
        self._write_atomic(self._record_path(b.id), json.dumps(b.record()))

    def _forget(self, b: Backend) -> None:
        try:
            os.unlink(self._record_path(b.id))
        except FileNotFoundError:
            pass

    # ---- starting

    def count(self, uid: int | None = None) -> int:
        return sum(1 for b in self.backends.values() if b.state != EXITED and (uid is None or b.owner_uid == uid))

    def spawn(
        self,
        *,
        descriptor: str,
        argv: tuple[str, ...],
        socket_fd: int,
        owner: str,
        owner_uid: int,
        detached: bool,
        exec_prefix: tuple[str, ...] = (),
    ) -> Backend:
        """Start one backend with ``socket_fd`` as its fd 3. Raises SpawnError."""
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        null = procs.open_devnull()
        try:
            pid = procs.spawn(
                [*exec_prefix, *argv], fds={0: null, 1: out_w, 2: out_w, 3: socket_fd}, keep_sigpipe_ignored=True
            )
        except OSError as e:
            os.close(out_r)
            raise SpawnError(f"cannot run {argv[0]}: {e.strerror}") from None
        finally:
            os.close(out_w)
            os.close(null)
        exited = self.reaper.watch(pid)
        b = Backend(
            id=self._next_id(), descriptor=descriptor, binary=argv[0], argv=argv, pid=pid, owner=owner,
            owner_uid=owner_uid, detached=detached, started_at=time.time_ns() // 1000,
            start_time=0, exe="", exited=exited,
        )
        self.backends[b.id] = b
        self._read_output(b, out_r)
        exited.add_done_callback(lambda f: self._on_exit(b, f.result()))
        self._save(b)
        # Reading /proc/PID/* while the child is still inside exec blocks until the exec is
        # done (~0.5 ms): identify it a moment later. Through setpriv or a wrapper script the
        # program is final only after another exec: look again after a second.
        self.loop.call_later(0.05, self._identify, b)
        self.loop.call_later(1.0, self._identify, b)
        log.info("backend %s started: pid %d, %s, owner %s (uid %d)%s", b.id, pid, " ".join(argv),
                 owner, owner_uid, ", detached" if detached else "")
        return b

    async def settle(self, b: Backend, ms: int) -> None:
        """Raise SpawnError if ``b`` exits within ``ms`` milliseconds."""
        assert b.exited is not None
        if ms > 0:
            try:
                await asyncio.wait_for(asyncio.shield(b.exited), ms / 1000)
            except TimeoutError:
                pass
        if b.exited.done():
            await asyncio.sleep(0)  # let the output reader drain what is already there
            self._drain(b)
            tail = bytes(b.log[-2048:]).decode("utf-8", "replace").strip()
            raise SpawnError(f"{b.binary} {procs.status_text(b.exited.result())} at once"
                             + (f"; its output ends with:\n{tail}" if tail else " (no output)"))
        self._identify(b)

    def _identify(self, b: Backend) -> None:
        """Record what re-adoption checks: start time, executable, output pipe."""
        if b.state == EXITED:
            return
        start_time = b.start_time or _proc_start_time(b.pid) or 0
        exe = _proc_exe(b.pid) or b.exe
        log_pipe = b.log_pipe or _fd_target(b.pid, 1) or ""
        if (start_time, exe, log_pipe) != (b.start_time, b.exe, b.log_pipe):
            b.start_time, b.exe, b.log_pipe = start_time, exe, log_pipe
            self._save(b)

    # ---- output

    def _read_output(self, b: Backend, fd: int) -> None:
        os.set_blocking(fd, False)
        b.out_fd = fd
        self.loop.add_reader(fd, self._drain, b)

    def _drain(self, b: Backend) -> None:
        fd = b.out_fd
        if fd < 0:
            return
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self.loop.remove_reader(fd)
                os.close(fd)
                b.out_fd = -1
                if b._partial:
                    self._log_line(b, b._partial)
                    b._partial = b""
                return
            b.log += chunk
            if len(b.log) > LOG_KEEP:
                del b.log[: len(b.log) - LOG_KEEP]
            lines = (b._partial + chunk).split(b"\n")
            b._partial = lines.pop()[-LINE_MAX:]
            for line in lines:
                self._log_line(b, line)

    def _log_line(self, b: Backend, line: bytes) -> None:
        log.info("backend %s: %s", b.id, line[:LINE_MAX].decode("utf-8", "replace").rstrip())

    # ---- exit and stop

    def _on_exit(self, b: Backend, status: int) -> None:
        b.exit_status, b.exit_signal = procs.describe_status(status)
        b.state = EXITED
        # Members of its group are orphans now: a backend takes its helpers with it.
        procs.kill_group(b.pid)
        self._forget(b)
        self._drain(b)
        log.info("backend %s (pid %d) %s", b.id, b.pid, procs.status_text(status) if status >= 0
                 else "exited (status unknown: re-adopted after a restart)")
        self.on_change(b, "exited")

    def stop(self, b: Backend) -> asyncio.Task[None]:
        """SIGTERM the group, SIGKILL after the grace period; done when the process is gone."""
        if b._stopping is None:
            b._stopping = asyncio.ensure_future(self._stop(b))
        return b._stopping

    async def _stop(self, b: Backend) -> None:
        assert b.exited is not None
        if b.exited.done():
            return
        b.state = STOPPING
        self.on_change(b, "state")
        procs.kill_group(b.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(b.exited), self.grace_period)
        except TimeoutError:
            log.warning("backend %s (pid %d) ignored SIGTERM for %gs: SIGKILL", b.id, b.pid, self.grace_period)
            procs.kill_group(b.pid, signal.SIGKILL)
            await asyncio.shield(b.exited)

    def remove(self, b: Backend) -> None:
        self.backends.pop(b.id, None)

    # ---- restart

    def readopt(self) -> list[Backend]:
        """Take back the backends a previous instance recorded and that still run."""
        adopted = []
        for name in sorted(os.listdir(self.state_dir)):
            if not (name.startswith("backend-") and name.endswith(".json")):
                continue
            path = os.path.join(self.state_dir, name)
            try:
                with open(path) as f:
                    rec = json.load(f)
                pid, start_time, exe = int(rec["pid"]), int(rec["start_time"]), str(rec["exe"])
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("%s: unreadable state record, removed", path)
                os.unlink(path)
                continue
            current = _proc_exe(pid)
            expected = {exe, os.path.realpath(str(rec.get("binary", ""))), SETPRIV}
            if start_time:
                same = _proc_start_time(pid) == start_time
            else:  # recorded before it could be identified: its start must match the spawn's
                began = _proc_start_epoch(pid)
                same = began is not None and abs(began - int(rec["started_at"]) / 1e6) < 2.0
            # Not identified yet (killed within 50 ms of the spawn): the start time decides.
            if not same or (exe and current not in expected):
                log.info("backend %s (pid %d) is gone; record removed", rec.get("id"), pid)
                os.unlink(path)
                continue
            b = Backend(
                id=str(rec["id"]), descriptor=rec["descriptor"], binary=rec["binary"], argv=tuple(rec["argv"]),
                pid=pid, owner=rec["owner"], owner_uid=int(rec["owner_uid"]), detached=bool(rec["detached"]),
                started_at=int(rec["started_at"]), start_time=start_time, exe=current or exe,
                log_pipe=rec.get("log_pipe", ""), adopted=True,
            )
            b.exited = self.reaper.watch(pid)
            self.backends[b.id] = b
            if b.log_pipe.startswith("pipe:") and _fd_target(pid, 1) == b.log_pipe:
                try:
                    # The same pipe, opened anew through /proc: its output reaches us again.
                    self._read_output(b, os.open(f"/proc/{pid}/fd/1", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK))
                except OSError as e:
                    log.debug("backend %s: cannot reopen its output: %s", b.id, e)

            def on_exit(f: asyncio.Future[int], b: Backend = b) -> None:
                self._on_exit(b, f.result())

            b.exited.add_done_callback(on_exit)
            adopted.append(b)
            log.info("backend %s (pid %d, %s) re-adopted", b.id, pid, b.descriptor)
        return adopted
