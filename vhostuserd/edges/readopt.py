"""Re-adoption after a restart: which backends a previous instance of the daemon left running
(even one killed by SIGKILL) are still the same processes, and taking back their output.

A backend is identified by its pidfd from the systemd fd store (`fdstore`), or by its
recorded pid (`records`) with the same start time and executable; a damaged record is
quarantined, never trusted, and its backend still adopted with what /proc says, or reported,
where it can be. The backend runs as its caller, who may change its fd table at any time: so
nothing is opened by path through it. The output pipe comes back from the fd store (where the
daemon put its read end at spawn), else with pidfd_getfd(2), accepted only if it is the very
pipe recorded at spawn; else the log starts empty, with a warning. The supervisor watches each
backend found here again (`Supervisor.readopt`)."""

from __future__ import annotations

import fcntl
import logging
import os
import stat
from dataclasses import dataclass
from typing import Any

from vhostuserd.core.lifecycle import Lifecycle
from vhostuserd.core.policy import SETPRIV
from vhostuserd.edges import procs
from vhostuserd.edges.backend import Backend
from vhostuserd.edges.cgroup import Cgroups
from vhostuserd.edges.fdstore import FdStore
from vhostuserd.edges.records import Records

log = logging.getLogger("vhostuserd.readopt")


def proc_start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return int(fields[19])  # field 22, starttime, counted after "pid (comm)"


def _proc_start_epoch(pid: int) -> float | None:
    """When ``pid`` started, in seconds since the epoch (boot time + its start ticks)."""
    ticks = proc_start_time(pid)
    if ticks is None:
        return None
    try:
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, StopIteration, ValueError):
        return None
    return btime + ticks / os.sysconf("SC_CLK_TCK")


def proc_exe(pid: int) -> str | None:
    """The executable ``pid`` runs; None if it is gone (or not ours to see)."""
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


@dataclass
class Found:
    """A recorded (or stored) backend whose process still runs, as `Readopter.find` found it."""

    backend: Backend  # with its pidfd, not watched yet
    stored_log: int | None  # the read end of its output pipe from the fd store, not checked yet
    pidfd_stored: bool  # the store had a pidfd under its name (so none is added)
    damaged: bool  # its record was damaged or missing: written anew once it is watched


class Readopter:
    """Finds the backends a previous instance recorded (or stored) that still run."""

    def __init__(self, records: Records, store: FdStore, cgroups: Cgroups) -> None:
        self.records = records
        self.store = store
        self.cgroups = cgroups
        self._pipefs = _pipefs_dev()

    def ids(self) -> list[str]:
        """The backends to look for: every record, and every pidfd stored with none."""
        ids = self.records.ids()
        for name in sorted(self.store.taken):  # stored, with no record left at all
            backend_id = name[len("backend-") :].rsplit("-", 1)[0]
            if backend_id not in ids and name.endswith("-pid"):
                ids.append(backend_id)
        return ids

    def find(self, backend_id: str) -> Found | None:
        """The backend, from its record where that is sound and from /proc for the rest, if
        its process still runs; else None, its record removed or quarantined and what the
        store held for it dropped."""
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
        exe = proc_exe(pid) or rec.get("exe", "")
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
        return Found(b, stored_log, stored_pidfd is not None, bool(bad))

    def take_output(self, b: Backend, stored_log: int | None) -> int | None:
        """The read end of ``b``'s output pipe (kept in the fd store), if it can be had safely:
        the stored one if it is that pipe, else one taken from its fd table; else None."""
        out = None
        if stored_log is not None:
            if self._our_pipe(stored_log, b.log_pipe, read_end=True):
                out = stored_log
            else:
                log.warning("backend %s: the stored fd is not its output pipe: ignored", b.id)
                os.close(stored_log)
                self.store.remove(f"backend-{b.id}-log")
        if out is None:
            out = self._from_fd_table(b)
            if out is not None:
                self.store.add(f"backend-{b.id}-log", out)
        if out is None:
            log.warning(
                "backend %s (pid %d): its output pipe cannot be taken back safely (its stdout is "
                "not the pipe recorded at spawn); its log starts empty and stays so",
                b.id,
                b.pid,
            )
        return out

    def finish(self, adopted: list[Backend]) -> None:
        """After the last `find`: leftover cgroups swept, what the store still holds closed."""
        self._sweep_cgroups({b.cgroup for b in adopted})
        for name, fd in list(self.store.taken.items()):  # of backends that are gone
            os.close(fd)
            self.store.remove(name)
        self.store.taken.clear()

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

    def _from_fd_table(self, b: Backend) -> int | None:
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
                return pid, stored_pidfd, proc_start_time(pid) or rec.get("start_time", 0)
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
        current = proc_exe(pid)
        expected = {rec.get("exe", ""), os.path.realpath(rec.get("binary", "") or "/"), SETPRIV}
        if rec.get("start_time"):
            same = proc_start_time(pid) == rec["start_time"]
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
        return pid, pidfd, rec.get("start_time") or proc_start_time(pid) or 0

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
