"""Running backends: start, watch, log and stop them. The process edge of Spawn, with no
D-Bus in it.

Owns each backend's life: started by `procs.spawn` in its own session with the socket as
fd 3, stdout/stderr into a pipe read on the event loop, its exit seen through a pidfd held
from the spawn on (no thread per backend), stopped with SIGTERM to its process group and
SIGKILL when the grace period runs out. Every signal goes through that pidfd, never to a
pid or group number that may have been freed and reused (`procs.signal_group`).
Each step of a backend's life (spawned, settled, stopped, killed, exited, respawned, ...)
is one event of its life cycle (`core.lifecycle`), taken by `Supervisor._advance` alone,
which reports the transition to the bus.

The backend runs as the caller, who owns its process: it may ptrace it, read and write its
fds. So nothing the daemon does with it may depend on what its fd table holds: output is
read from the daemon's own end of the pipe, a bounded amount per wake-up and per second,
and only a rate-limited share of it goes to the daemon's log (the last 64 KiB are kept for
GetLog whatever the rate).

While it runs, each backend has a record in the state directory (`records`) and, under
systemd, its pidfd and the read end of its output pipe are in the fd store (`fdstore`), so a
restarted daemon (even after SIGKILL) takes back those still alive: `readopt` finds which
they are, and the supervisor watches them again from there (`Supervisor.readopt`).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping

from vhostuserd.core.lifecycle import Event, Lifecycle, Transition
from vhostuserd.edges import procs
from vhostuserd.edges.backend import Backend
from vhostuserd.edges.cgroup import Cgroups, Usage
from vhostuserd.edges.fdstore import FdStore
from vhostuserd.edges.lograte import LOG_BURST_ALL, LOG_LINES_PER_S, LOG_LINES_PER_S_ALL, Bucket
from vhostuserd.edges.readopt import Readopter, proc_exe, proc_start_time
from vhostuserd.edges.records import Records

log = logging.getLogger("vhostuserd.supervisor")

LOG_KEEP = 64 * 1024  # what GetLog returns at most: the last 64 KiB of output
LINE_MAX = 1024  # longest line passed to the daemon's log (the rest is cut)
READ_CHUNK = 16 * 1024  # read at most this much per wake-up of a backend's pipe
READ_PER_S = 1024 * 1024  # read at most this much per backend per second; then it waits


class SpawnError(Exception):
    """The backend could not be started or died at once; the message says how."""


class Supervisor:
    """All backends of this daemon. ``on_change(backend, transition)`` reports every step of a
    backend's life cycle (`core.lifecycle`), as `_advance` takes it; whoever runs the backends
    for its callers (`bus.backends.Spawner`) sets it."""

    def __init__(
        self,
        reaper: procs.Reaper,
        state_dir: str,
        grace_period: float,
        on_change: Callable[[Backend, Transition], None] = lambda _b, _step: None,
        store: FdStore | None = None,
        cgroups: Cgroups | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.reaper = reaper
        self.state_dir = state_dir
        self.grace_period = grace_period
        self.on_change = on_change
        self.store = store if store is not None else FdStore()
        self.cgroups = cgroups if cgroups is not None else Cgroups(why="not asked for")
        self.backends: dict[str, Backend] = {}
        self._lines = Bucket(LOG_LINES_PER_S_ALL, LOG_BURST_ALL)
        self.records = Records(state_dir)
        self._readopter = Readopter(self.records, self.store, self.cgroups)

    # ---- starting

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
        limits: dict[str, str] | None = None,
        extra_fds: Mapping[int, int] | None = None,
        replacing: Backend | None = None,
    ) -> Backend:
        """Start one backend with ``socket_fd`` as its fd 3. Raises SpawnError.

        ``extra_fds`` ({child fd: our fd}, above 3): what ``exec_prefix`` needs, e.g. the user
        namespace `userns.create` made; the prefix closes them before the backend runs.
        ``replacing``: the exited backend this one respawns; the new process (its own id and
        record) carries on its life (the same object), and the old one is forgotten."""
        backend_id = self.records.next_id(self.backends)
        cgroup, placement = self._cgroup_for(backend_id, limits)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        null = procs.open_devnull()
        try:
            command = [*exec_prefix, *argv]
            if placement and not os.access(command[0], os.X_OK):  # as posix_spawn would say at once
                err = errno.EACCES if os.path.exists(command[0]) else errno.ENOENT
                raise OSError(err, os.strerror(err))
            pid = procs.spawn(
                [*placement, *command],
                fds={0: null, 1: out_w, 2: out_w, 3: socket_fd, **(extra_fds or {})},
                keep_sigpipe_ignored=True,
            )
        except OSError as e:
            os.close(out_r)
            if cgroup:
                self.cgroups.remove(cgroup)
            raise SpawnError(f"cannot run {argv[0]}: {e.strerror}") from None
        finally:
            os.close(out_w)
            os.close(null)
        # Our unreaped child: this pid can be no other process (nor can it be while we do
        # not reap it, so the kill below, by number, is safe).
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as e:
            os.close(out_r)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise SpawnError(f"cannot watch {argv[0]} (pid {pid}, killed): {e.strerror}") from None
        b = Backend(
            id=backend_id,
            descriptor=descriptor,
            binary=argv[0],
            argv=argv,
            pid=pid,
            owner=owner,
            owner_uid=owner_uid,
            detached=detached,
            started_at=time.time_ns() // 1000,
            start_time=0,
            exe="",
            life=replacing.life if replacing is not None else Lifecycle(backend_id),
            log_pipe=f"pipe:[{os.fstat(out_r).st_ino}]",
            pidfd=pidfd,
            cgroup=cgroup,
        )
        b.exited = self.reaper.watch(pid, pidfd, before_reap=lambda: self._kill_helpers(b))
        self.backends[b.id] = b
        self._read_output(b, out_r)
        b.exited.add_done_callback(lambda f: self._on_exit(b, f.result()))
        self.records.save(b)
        self.store.add(f"backend-{b.id}-pid", pidfd)
        self.store.add(f"backend-{b.id}-log", out_r)
        # Reading /proc/PID/* while the child is still inside exec blocks until the exec is
        # done (~0.5 ms): identify it a moment later. Through setpriv or a wrapper script the
        # program is final only after another exec: look again after a second.
        self.loop.call_later(0.05, self._identify, b)
        self.loop.call_later(1.0, self._identify, b)
        log.info(
            "backend %s started: pid %d, %s, owner %s (uid %d)%s",
            b.id,
            pid,
            " ".join(argv),
            owner,
            owner_uid,
            ", detached" if detached else "",
        )
        if replacing is None:
            self._advance(b, Event.SPAWNED)
        else:
            self._discard(replacing)
            self._advance(b, Event.RESPAWNED)
        return b

    def _advance(self, b: Backend, event: Event) -> None:
        """The one way a backend's state changes: its life cycle's table decides (raising on an
        event its state does not allow), then the daemon hears of the step."""
        self.on_change(b, b.life.advance(event))

    def _cgroup_for(
        self, backend_id: str, limits: dict[str, str] | None
    ) -> tuple[str, tuple[str, ...]]:
        """The backend's own cgroup and the launcher prefix that enters it before the backend
        runs (`cgroup` module); ("", ()) without cgroups, or when it cannot be made."""
        if not self.cgroups.enabled:
            return "", ()
        try:
            path = self.cgroups.create(backend_id, limits)
        except OSError as e:
            log.warning(
                "backend %s: cannot make its cgroup: %s; it runs in the daemon's",
                backend_id,
                e.strerror,
            )
            return "", ()
        return path, self.cgroups.launcher(path)

    async def settle(self, b: Backend, ms: int) -> None:
        """Raise SpawnError if ``b`` exits within ``ms`` milliseconds."""
        assert b.exited is not None
        if ms > 0:
            try:
                await asyncio.wait_for(asyncio.shield(b.exited), ms / 1000)
            except TimeoutError:
                pass
        if b.exited.done():
            await asyncio.sleep(0)  # let the output reader take what is already there
            for _ in range(LOG_KEEP // READ_CHUNK):
                if not self._read_some(b):
                    break
            tail = bytes(b.log[-2048:]).decode("utf-8", "replace").strip()
            raise SpawnError(
                f"{b.binary} {procs.status_text(b.exited.result())} at once"
                + (f"; its output ends with:\n{tail}" if tail else " (no output)")
            )
        self._advance(b, Event.SETTLED)
        self._identify(b)

    def _identify(self, b: Backend) -> None:
        """Record what re-adoption checks: start time and executable."""
        if b.exited is None or b.exited.done():  # its process is gone (a respawn's old one too)
            return
        start_time = b.start_time or proc_start_time(b.pid) or 0
        exe = proc_exe(b.pid) or b.exe
        if (start_time, exe) != (b.start_time, b.exe):
            b.start_time, b.exe = start_time, exe
            self.records.save(b)

    # ---- output

    def _read_output(self, b: Backend, fd: int) -> None:
        os.set_blocking(fd, False)
        b.out_fd = fd
        self.loop.add_reader(fd, self._read_some, b)

    def _read_some(self, b: Backend) -> bool:
        """One bounded read of ``b``'s output (never until the pipe is empty: a writer can
        keep it full). True if there may be more to read now."""
        fd = b.out_fd
        if fd < 0:
            return False
        try:
            chunk = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return False
        except OSError:
            chunk = b""
        if not chunk:
            self._close_output(b)
            if b._partial:
                self._log_lines(b, [b._partial])
                b._partial = b""
            return False
        b.log += chunk
        if len(b.log) > LOG_KEEP:
            del b.log[: len(b.log) - LOG_KEEP]
        lines = (b._partial + chunk).split(b"\n")
        b._partial = lines.pop()[-LINE_MAX:]
        self._log_lines(b, lines)
        now = self.loop.time()
        if now - b._window >= 1.0:
            b._window, b._window_bytes = now, 0
        b._window_bytes += len(chunk)
        if b._window_bytes >= READ_PER_S:
            # Enough for this second: the writer waits on a full pipe until the next.
            self.loop.remove_reader(fd)
            self.loop.call_at(b._window + 1.0, self._resume_output, b, fd)
            return False
        return True

    def _resume_output(self, b: Backend, fd: int) -> None:
        if b.out_fd == fd:
            self.loop.add_reader(fd, self._read_some, b)

    def _close_output(self, b: Backend) -> None:
        if b.out_fd >= 0:
            self.loop.remove_reader(b.out_fd)
            os.close(b.out_fd)
            b.out_fd = -1

    def _log_lines(self, b: Backend, lines: list[bytes]) -> None:
        """Pass lines to the daemon's log within the rates; count the rest, and say so."""
        now = time.monotonic()
        for i, line in enumerate(lines):
            if not (b._lines.take(now) and self._lines.take(now)):
                if not b._suppressed:
                    self.loop.call_later(1.0, self._note_suppressed, b)
                b._suppressed += len(lines) - i
                return
            log.info("backend %s: %s", b.id, line[:LINE_MAX].decode("utf-8", "replace").rstrip())

    def _note_suppressed(self, b: Backend) -> None:
        n, b._suppressed = b._suppressed, 0
        if n:
            log.warning(
                "backend %s: suppressed %d lines of output (more than %d lines/s per backend or %d "
                "in all for the daemon's log; GetLog keeps the last %d KiB)",
                b.id,
                n,
                LOG_LINES_PER_S,
                LOG_LINES_PER_S_ALL,
                LOG_KEEP // 1024,
            )

    # ---- exit and stop

    def _signal(self, b: Backend, sig: int) -> None:
        """``sig`` to the backend's process group, through the pidfd held since the spawn."""
        if b.pidfd >= 0:
            own_unreaped = not b.adopted and b.exited is not None and not b.exited.done()
            procs.signal_group(b.pidfd, b.pid, sig, leader_unreaped=own_unreaped)

    def _kill_helpers(self, b: Backend) -> None:
        """The backend has exited and is not reaped yet: the members left in its group are
        orphans now, and a backend takes its helpers with it."""
        if b.pidfd >= 0:
            procs.signal_group(b.pidfd, b.pid, signal.SIGKILL, leader_unreaped=not b.adopted)
        if b.cgroup:  # and whatever left the group (setsid, double fork): the cgroup holds it
            self.cgroups.kill(b.cgroup)

    def _on_exit(self, b: Backend, status: int) -> None:
        b.exit_status, b.exit_signal = procs.describe_status(status)
        if b.pidfd >= 0:
            os.close(b.pidfd)
            b.pidfd = -1
        self.store.remove(f"backend-{b.id}-pid")
        self.store.remove(f"backend-{b.id}-log")
        self.records.forget(b.id)
        self._read_some(b)
        consumed = ""
        if b.cgroup:
            b.usage = self.cgroups.usage(b.cgroup)
            consumed = f"; consumed {b.usage.text()}"
            self._remove_cgroup(b.cgroup)
        log.info(
            "backend %s (pid %d) %s%s",
            b.id,
            b.pid,
            procs.status_text(status)
            if status >= 0
            else "exited (status unknown: re-adopted after a restart)",
            consumed,
        )
        self._advance(b, Event.EXITED)

    def _remove_cgroup(self, path: str, delay: float = 0.005) -> None:
        """rmdir the cgroup once its killed members are gone (they leave it as they die)."""
        if self.cgroups.remove(path):
            return
        if delay > 5.0:
            log.warning("cgroup %s: still populated 10 s after cgroup.kill; left in place", path)
            return
        self.cgroups.kill(path)
        self.loop.call_later(delay, self._remove_cgroup, path, delay * 2)

    def usage(self, b: Backend) -> Usage:
        """What ``b`` consumed so far (final once it exited); all -1 without a cgroup."""
        if b.cgroup and b.life.alive:
            return self.cgroups.usage(b.cgroup)
        return b.usage

    def stop(self, b: Backend, why: Event = Event.STOP) -> asyncio.Task[None]:
        """SIGTERM the group, SIGKILL after the grace period; done when the process is gone.
        ``why``: Stop, or its owner left the bus (`Event.OWNER_LEFT`)."""
        self._advance(b, why)
        if b._stopping is None:
            b._stopping = asyncio.ensure_future(self._stop(b))
        return b._stopping

    async def _stop(self, b: Backend) -> None:
        assert b.exited is not None
        if b.exited.done():
            return
        self._signal(b, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(b.exited), self.grace_period)
        except TimeoutError:
            log.warning(
                "backend %s (pid %d) ignored SIGTERM for %gs: SIGKILL",
                b.id,
                b.pid,
                self.grace_period,
            )
            self._advance(b, Event.GRACE_EXPIRED)
            self._signal(b, signal.SIGKILL)
            if b.cgroup:
                self.cgroups.kill(b.cgroup)
            await asyncio.shield(b.exited)

    def remove(self, b: Backend) -> None:
        """Its object left the bus: forget the exited backend."""
        self._advance(b, Event.REMOVED)
        self._discard(b)

    def _discard(self, b: Backend) -> None:
        """Forget an exited process: its output too, even if something outside its group
        still holds the pipe's write end."""
        self.backends.pop(b.id, None)
        self._close_output(b)

    # ---- restart

    def readopt(self) -> list[Backend]:
        """Take back the backends a previous instance recorded (or stored) that still run."""
        adopted = []
        for backend_id in self._readopter.ids():
            try:
                b = self._readopt_one(backend_id)
            except Exception as e:  # noqa: BLE001 - one backend must never stop the start-up
                log.error(
                    "backend %s: cannot be re-adopted: %s: %s", backend_id, type(e).__name__, e
                )
                continue
            if b is not None:
                adopted.append(b)
        self._readopter.finish(adopted)
        return adopted

    def _readopt_one(self, backend_id: str) -> Backend | None:
        """Watch the backend again if `Readopter.find` identifies its process."""
        found = self._readopter.find(backend_id)
        if found is None:
            return None
        b = found.backend
        b.exited = self.reaper.watch(
            b.pid, b.pidfd, before_reap=lambda: self._kill_helpers(b), child=False
        )
        self.backends[b.id] = b
        self._advance(b, Event.READOPTED)
        out = self._readopter.take_output(b, found.stored_log)
        if out is not None:
            self._read_output(b, out)
        if not found.pidfd_stored:
            self.store.add(f"backend-{b.id}-pid", b.pidfd)
        if found.damaged:
            self.records.save(b)

        def on_exit(f: asyncio.Future[int], b: Backend = b) -> None:
            self._on_exit(b, f.result())

        b.exited.add_done_callback(on_exit)
        log.info("backend %s (pid %d, %s) re-adopted", b.id, b.pid, b.descriptor)
        return b
