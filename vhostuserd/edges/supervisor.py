"""Running backends: start, watch, log, stop, record and re-adopt them. The process edge
of Spawn, with no D-Bus in it.

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

Each running backend has a small state file, so a restarted daemon (even after SIGKILL)
re-adopts those still alive with the same pid, start time and executable; a damaged record
is quarantined (``.bad``), never trusted, and its backend still adopted or reported where
it can be. The output pipe is taken back without opening anything by path through the
backend's fd table: from the systemd file descriptor store (`FdStore`, where the daemon
put its read end and the pidfd at spawn), else with pidfd_getfd(2), accepted only if it is
the very pipe recorded at spawn; else the log starts empty, with a warning.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import signal
import stat
import time
from collections.abc import Callable, Mapping
from typing import Any

from vhostuserd.core.lifecycle import Event, Lifecycle, Transition
from vhostuserd.core.policy import SETPRIV
from vhostuserd.edges import procs
from vhostuserd.edges.backend import Backend
from vhostuserd.edges.cgroup import Cgroups, Usage
from vhostuserd.edges.fdstore import FdStore
from vhostuserd.edges.lograte import LOG_BURST_ALL, LOG_LINES_PER_S, LOG_LINES_PER_S_ALL, Bucket
from vhostuserd.edges.records import Records

log = logging.getLogger("vhostuserd.supervisor")

LOG_KEEP = 64 * 1024  # what GetLog returns at most: the last 64 KiB of output
LINE_MAX = 1024  # longest line passed to the daemon's log (the rest is cut)
READ_CHUNK = 16 * 1024  # read at most this much per wake-up of a backend's pipe
READ_PER_S = 1024 * 1024  # read at most this much per backend per second; then it waits


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


def _proc_uid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def _proc_cmdline(pid: int) -> tuple[str, ...]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return ()
    return tuple(a.decode("utf-8", "surrogateescape") for a in raw.split(b"\0")[:-1])


def _pipefs_dev() -> int:
    r, w = os.pipe()
    try:
        return os.fstat(r).st_dev
    finally:
        os.close(r)
        os.close(w)


class Supervisor:
    """All backends of this daemon. ``on_change(backend, transition)`` reports every step of a
    backend's life cycle (`core.lifecycle`), as `_advance` takes it."""

    def __init__(
        self,
        reaper: procs.Reaper,
        state_dir: str,
        grace_period: float,
        on_change: Callable[[Backend, Transition], None],
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
        self._pipefs = _pipefs_dev()
        self.records = Records(state_dir)

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
        start_time = b.start_time or _proc_start_time(b.pid) or 0
        exe = _proc_exe(b.pid) or b.exe
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

    def _our_pipe(self, fd: int, log_pipe: str, *, read_end: bool) -> bool:
        """Is ``fd`` (an open file we hold) the backend's output pipe recorded at spawn?"""
        try:
            st = os.fstat(fd)
            mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        except OSError:
            return False
        if not stat.S_ISFIFO(st.st_mode) or st.st_dev != self._pipefs:
            return False
        if read_end and mode != os.O_RDONLY:
            return False
        return not log_pipe or log_pipe == f"pipe:[{st.st_ino}]"

    def _take_output(self, b: Backend) -> int | None:
        """A read end of the backend's output pipe, from the fd object its stdout or stderr
        holds (pidfd_getfd), if that is the pipe recorded at spawn; else None. The fd table
        is the caller's to change at any time: whatever it holds is checked on our copy,
        which it cannot change, and only our own copy is reopened (for reading)."""
        if not b.log_pipe.startswith("pipe:["):
            return None
        for target in (1, 2):
            try:
                got = procs.pidfd_getfd(b.pidfd, target)
            except OSError as e:
                log.debug("backend %s: pidfd_getfd of its fd %d: %s", b.id, target, e.strerror)
                continue
            try:
                if self._our_pipe(got, b.log_pipe, read_end=False):
                    return os.open(
                        f"/proc/self/fd/{got}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
                    )
            except OSError as e:
                log.debug("backend %s: cannot reopen its output pipe: %s", b.id, e.strerror)
            finally:
                os.close(got)
        return None

    def _identify_adopted(
        self, backend_id: str, rec: dict[str, Any], stored_pidfd: int | None
    ) -> tuple[int, int, int] | None:
        """(pid, pidfd, start time) of the recorded backend if it still runs, else None.

        A pidfd from the store is the process itself. Otherwise one is opened for the
        recorded pid first, and the process checked after (start time, executable): a
        process that took the pid before the open fails the check; one after cannot be
        what the pidfd refers to."""
        if stored_pidfd is not None:
            pid = procs.pidfd_pid(stored_pidfd)
            if pid > 0 and rec.get("pid", pid) == pid:
                return pid, stored_pidfd, _proc_start_time(pid) or rec.get("start_time", 0)
            os.close(stored_pidfd)
            if pid > 0:
                log.warning(
                    "backend %s: its recorded pid %s is not its process's (%d): ignored",
                    backend_id,
                    rec.get("pid"),
                    pid,
                )
        if "pid" not in rec or not ("start_time" in rec or "started_at" in rec):
            return None
        pid = rec["pid"]
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return None
        current = _proc_exe(pid)
        expected = {rec.get("exe", ""), os.path.realpath(rec.get("binary", "") or "/"), SETPRIV}
        if rec.get("start_time"):
            same = _proc_start_time(pid) == rec["start_time"]
        elif (
            "started_at" in rec
        ):  # recorded before it could be identified: its start must match the spawn's
            began = _proc_start_epoch(pid)
            same = began is not None and abs(began - rec["started_at"] / 1e6) < 2.0
        else:
            same = False
        # Not identified yet (killed within 50 ms of the spawn): the start time decides.
        if not same or (rec.get("exe") and current not in expected):
            os.close(pidfd)
            return None
        return pid, pidfd, rec.get("start_time") or _proc_start_time(pid) or 0

    def _adopted_cgroup(self, backend_id: str, pid: int, recorded: str) -> str:
        """The re-adopted backend's cgroup: where the kernel says its process is, if that is
        one of ours (a record is only a hint)."""
        if not self.cgroups.enabled:
            return ""
        found = self.cgroups.of_process(pid)
        if found is None:
            if recorded:
                log.warning(
                    "backend %s (pid %d): not in its recorded cgroup %s any more",
                    backend_id,
                    pid,
                    recorded,
                )
            return ""
        if recorded and recorded != found:
            log.warning(
                "backend %s (pid %d): in cgroup %s, not the recorded %s",
                backend_id,
                pid,
                found,
                recorded,
            )
        return found

    def _sweep_cgroups(self, adopted: set[str]) -> None:
        """Cgroups of backends that went while no daemon ran are removed; one that still holds
        processes but belongs to no backend we could identify is reported, and left alone."""
        for path in self.cgroups.leftovers():
            if path in adopted:
                continue
            if not self.cgroups.populated(path):
                self.cgroups.remove(path)
                continue
            log.warning(
                "cgroup %s holds processes (%s) of no backend that could be re-adopted; left "
                "running, unsupervised (echo 1 > %s/cgroup.kill ends them)",
                path,
                " ".join(map(str, self.cgroups.members(path)[:10])),
                path,
            )

    def readopt(self) -> list[Backend]:
        """Take back the backends a previous instance recorded (or stored) that still run."""
        adopted = []
        ids = self.records.ids()
        for name in sorted(self.store.taken):  # stored, with no record left at all
            backend_id = name[len("backend-") :].rsplit("-", 1)[0]
            if backend_id not in ids and name.endswith("-pid"):
                ids.append(backend_id)
        for backend_id in ids:
            try:
                b = self._readopt_one(backend_id)
            except Exception as e:  # noqa: BLE001 - one backend must never stop the start-up
                log.error(
                    "backend %s: cannot be re-adopted: %s: %s", backend_id, type(e).__name__, e
                )
                continue
            if b is not None:
                adopted.append(b)
        self._sweep_cgroups({b.cgroup for b in adopted})
        for name, fd in list(self.store.taken.items()):  # of backends that are gone
            os.close(fd)
            self.store.remove(name)
        self.store.taken.clear()
        return adopted

    def _readopt_one(self, backend_id: str) -> Backend | None:
        stored_pidfd = self.store.pop(f"backend-{backend_id}-pid")
        stored_log = self.store.pop(f"backend-{backend_id}-log")
        rec, bad = self.records.load(backend_id)
        if not backend_id.isdigit():
            rec, bad = {}, ["not a backend id of ours"]
        found = self._identify_adopted(
            backend_id, rec, stored_pidfd if backend_id.isdigit() else None
        )
        if found is None:
            for fd in (stored_log,) if stored_log is not None else ():
                os.close(fd)
            for what in ("pid", "log"):
                self.store.remove(f"backend-{backend_id}-{what}")
            if bad and self.records.has(backend_id):
                self.records.quarantine(
                    backend_id,
                    f"record of backend {backend_id} is damaged ({', '.join(bad)}); "
                    "its process cannot be identified, so it is not supervised",
                )
            elif bad:
                log.warning("backend %s: stored, but with no record: gone", backend_id)
            elif self.records.has(backend_id):
                log.info("backend %s (pid %d) is gone; record removed", backend_id, rec["pid"])
                self.records.forget(backend_id)
            return None
        pid, pidfd, start_time = found
        if bad:
            if self.records.has(backend_id):
                self.records.quarantine(
                    backend_id,
                    f"record of backend {backend_id} is damaged ({', '.join(bad)}); its process "
                    f"(pid {pid}) still runs and is re-adopted with what /proc says",
                )
            else:
                log.warning(
                    "backend %s (pid %d): found in the file descriptor store with no record; "
                    "re-adopted with what /proc says",
                    backend_id,
                    pid,
                )
        exe = _proc_exe(pid) or rec.get("exe", "")
        began = _proc_start_epoch(pid)
        b = Backend(
            id=backend_id,
            descriptor=rec.get("descriptor", ""),
            binary=rec.get("binary", exe),
            argv=tuple(rec["argv"]) if "argv" in rec else (_proc_cmdline(pid) or (exe,)),
            pid=pid,
            # Whose it is and whether it outlives its owner: unknown means root's to manage,
            # the process's own uid (what it runs as), and never stopped for a departure.
            owner=rec.get("owner", "") if "owner" in rec and "detached" in rec else "",
            owner_uid=rec["owner_uid"] if "owner_uid" in rec else (_proc_uid(pid) or 0),
            detached=rec["detached"] if "owner" in rec and "detached" in rec else True,
            started_at=rec["started_at"] if "started_at" in rec else int((began or 0) * 1e6),
            start_time=start_time,
            exe=exe,
            life=Lifecycle(backend_id),
            log_pipe=rec.get("log_pipe", ""),
            adopted=True,
            pidfd=pidfd,
            cgroup=self._adopted_cgroup(backend_id, pid, rec.get("cgroup", "")),
        )
        b.exited = self.reaper.watch(
            pid, pidfd, before_reap=lambda: self._kill_helpers(b), child=False
        )
        self.backends[b.id] = b
        self._advance(b, Event.READOPTED)
        out = None
        if stored_log is not None:
            if self._our_pipe(stored_log, b.log_pipe, read_end=True):
                out = stored_log
            else:
                log.warning("backend %s: the stored fd is not its output pipe: ignored", b.id)
                os.close(stored_log)
                self.store.remove(f"backend-{b.id}-log")
        if out is None:
            out = self._take_output(b)
            if out is not None:
                self.store.add(f"backend-{b.id}-log", out)
        if out is None:
            log.warning(
                "backend %s (pid %d): its output pipe cannot be taken back safely (its stdout is "
                "not the pipe recorded at spawn); its log starts empty and stays so",
                b.id,
                pid,
            )
        else:
            self._read_output(b, out)
        if stored_pidfd is None:
            self.store.add(f"backend-{b.id}-pid", pidfd)
        if bad:
            self.records.save(b)

        def on_exit(f: asyncio.Future[int], b: Backend = b) -> None:
            self._on_exit(b, f.result())

        b.exited.add_done_callback(on_exit)
        log.info("backend %s (pid %d, %s) re-adopted", b.id, pid, b.descriptor)
        return b
