"""Starting and reaping child processes on the event loop: the process edge.

Owns how a child is made (posix_spawn: own session, chosen fds at chosen numbers, nothing
else inherited, default signal dispositions, minimal environment) and how its end is seen
(a pidfd on the event loop, no thread per child). The daemon is a child subreaper, so
processes that probes or backends leave behind are reaped here instead of lingering as
zombies; `Reaper` collects them.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import os
import signal
from collections.abc import Callable, Mapping, Sequence

MINIMAL_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C.UTF-8",
}

_PR_SET_CHILD_SUBREAPER = 36
# Every signal starts at its default in a child, whatever the daemon was started with: a
# daemon started from a background shell has SIGINT and SIGQUIT ignored, and its backends
# would inherit that (SIGKILL and SIGSTOP cannot be changed and are left out).
_DEFAULT_SIGNALS = set(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}
_FIRST_SAFE_FD = 10


def become_subreaper() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


def cloexec_dup(fd: int) -> int:
    """A close-on-exec copy of ``fd`` numbered high enough never to collide with a target."""
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, _FIRST_SAFE_FD)


def _no_inheritance() -> None:
    """Make every fd above 2 close-on-exec.

    PEP 446 covers the fds Python opens, not the ones this process inherited when it
    started (a shell's or a test harness's stray pipes): without this a child would get them.
    """
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass  # the fd listdir used, already closed


def spawn(
    argv: Sequence[str],
    *,
    fds: Mapping[int, int],
    env: Mapping[str, str] | None = None,
    keep_sigpipe_ignored: bool = False,
    new_session: bool = True,
) -> int:
    """Start ``argv`` in a new session with exactly the fds ``{child number: our fd}``.

    Every other fd of ours is close-on-exec (PEP 446; received fds are made so on arrival),
    so the child inherits nothing else. Raises OSError when the exec itself fails.

    ``keep_sigpipe_ignored``: backends keep SIGPIPE ignored (as Python has it), so that
    writing their log while the daemon restarts fails with EPIPE instead of killing them.
    """
    _no_inheritance()
    # dup2(fd, fd) would keep close-on-exec set: move every source above the targets first.
    moved = {target: cloexec_dup(source) for target, source in fds.items()}
    try:
        actions = [(os.POSIX_SPAWN_DUP2, src, target) for target, src in moved.items()]
        return os.posix_spawn(
            argv[0],
            list(argv),
            dict(env if env is not None else MINIMAL_ENV),
            file_actions=actions,
            setsid=new_session,
            setsigmask=(),
            setsigdef=_DEFAULT_SIGNALS - {signal.SIGPIPE}
            if keep_sigpipe_ignored
            else _DEFAULT_SIGNALS,
        )
    finally:
        for fd in moved.values():
            os.close(fd)


def open_devnull() -> int:
    return os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)


class Reaper:
    """Tells when children exit (pidfd readable), and reaps orphans handed to us (SIGCHLD).

    Whichever of the two sees a watched child's exit first runs its ``before_reap`` hook
    while the child is still an unreaped zombie (its pid, and so its process group number,
    cannot be reused yet), then collects its status and delivers it to the child's waiter.
    The SIGCHLD sweep peeks with ``WNOWAIT`` and never reaps a watched child behind its
    hook's back; orphans re-parented to us as subreaper are simply reaped.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._watched: dict[int, asyncio.Future[int]] = {}
        self._pidfds: dict[int, int] = {}
        self._own_pidfd: set[int] = set()
        self._before: dict[int, Callable[[], None]] = {}
        self.subreaper = False

    def install(self, subreaper: bool = False) -> None:
        """Watch SIGCHLD; with ``subreaper`` (the daemon), also adopt what children orphan.

        A short-lived process (vhostuserctl, a test) must not become a subreaper: orphans of
        other programs it started would become its zombies instead of init's."""
        if subreaper:
            self.subreaper = become_subreaper()
        self._loop.add_signal_handler(signal.SIGCHLD, self._sweep)

    def uninstall(self) -> None:
        self._loop.remove_signal_handler(signal.SIGCHLD)

    def watch(
        self,
        pid: int,
        pidfd: int | None = None,
        before_reap: Callable[[], None] | None = None,
        *,
        child: bool = True,
    ) -> asyncio.Future[int]:
        """Future of the raw wait status of ``pid`` (-1 when it cannot be known).

        ``pidfd``: the caller's own pidfd of the process (it stays the caller's to close);
        without one, the Reaper opens one. ``before_reap`` runs once, when the process has
        exited and before it is reaped. ``child=False``: a process that is not our child
        (re-adopted after a restart): it is never waited for, and watched by its pidfd
        alone, so a child of ours that gets the same pid later is not confused with it.
        Call right after spawning, before yielding to the loop, so no sweep comes between.
        """
        fut: asyncio.Future[int] = self._loop.create_future()
        own = pidfd is None
        if pidfd is None:
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                fut.set_result(-1)
                return fut
        if not child:

            def gone() -> None:
                self._loop.remove_reader(pidfd)
                if before_reap is not None:
                    before_reap()
                if own:
                    os.close(pidfd)
                if not fut.done():
                    fut.set_result(-1)

            self._loop.add_reader(pidfd, gone)
            return fut
        self._watched[pid] = fut
        if before_reap is not None:
            self._before[pid] = before_reap
        if own:
            self._own_pidfd.add(pid)
        self._pidfds[pid] = pidfd
        self._loop.add_reader(pidfd, self._finish, pid)
        return fut

    def _finish(self, pid: int) -> None:
        """Our child ``pid`` has exited (its pidfd is readable, or a sweep saw it): run its
        hook while it is an unreaped zombie, then reap it and deliver its status."""
        if pid not in self._watched:
            return
        hook = self._before.pop(pid, None)
        if hook is not None:
            hook()
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # reaped behind our back (cannot be by us): unknown
            got, status = pid, -1
        if got == pid:
            self._deliver(pid, status)

    def _deliver(self, pid: int, status: int) -> None:
        pidfd = self._pidfds.pop(pid, None)
        if pidfd is not None:
            self._loop.remove_reader(pidfd)
            if pid in self._own_pidfd:
                os.close(pidfd)
        self._own_pidfd.discard(pid)
        self._before.pop(pid, None)
        fut = self._watched.pop(pid, None)
        if fut is not None and not fut.done():
            fut.set_result(status)

    def _sweep(self) -> None:
        while True:
            try:
                # Peek first: a watched child is reaped only after its hook has run.
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None:
                return
            pid = info.si_pid
            if pid in self._watched:
                self._finish(pid)
                if pid in self._watched:  # not reapable after all: leave it to its pidfd
                    return
                continue
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


def describe_status(status: int) -> tuple[int, int]:
    """(exit status, signal number) from a raw wait status; -1 where it does not apply."""
    if status < 0:
        return -1, -1
    if os.WIFSIGNALED(status):
        return -1, os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status), -1
    return -1, -1


def status_text(status: int) -> str:
    code, sig = describe_status(status)
    if sig >= 0:
        try:
            return f"killed by signal {sig} ({signal.Signals(sig).name})"
        except ValueError:
            return f"killed by signal {sig}"
    if code >= 0:
        return f"exited with status {code}"
    return "exit status unknown"


def group_alive(pgid: int) -> bool:
    """Is any non-zombie process left in process group ``pgid``?"""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    """Signal a group by number: only for a group whose leader is our unreaped child (the
    probes'); backends are signalled through their pidfds (`signal_group`)."""
    try:
        os.killpg(pgid, sig)
    except OSError as e:
        if e.errno not in (errno.ESRCH, errno.EPERM):
            raise


# ---- signals and fds through pidfds: never a pid or group number that may have been reused

PIDFD_SIGNAL_PROCESS_GROUP = 4  # Linux 6.9: the group the pidfd's process leads
_SYS_PIDFD_GETFD = 438  # the same number on every architecture (the unified syscall table)


def signal_group(pidfd: int, pgid: int, sig: int, *, leader_unreaped: bool) -> None:
    """Send ``sig`` to every process of the group whose leader ``pidfd`` refers to.

    The pidfd pins the leader's struct pid, and the kernel signals the processes whose
    group is that struct pid: even after the leader is reaped and its number reused, a
    process that merely got the same number is never hit. Kernels before 6.9 lack the flag:
    then the group is signalled by number only while ``leader_unreaped`` (our own child,
    not reaped yet, holds the number), else only the leader is signalled, through its pidfd.
    """
    try:
        signal.pidfd_send_signal(pidfd, sig, None, PIDFD_SIGNAL_PROCESS_GROUP)
        return
    except (ProcessLookupError, PermissionError):
        return
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    if leader_unreaped:
        kill_group(pgid, sig)
        return
    try:
        signal.pidfd_send_signal(pidfd, sig)
    except (ProcessLookupError, PermissionError):
        pass


def pidfd_getfd(pidfd: int, targetfd: int) -> int:
    """A close-on-exec copy in our fd table of fd ``targetfd`` of the pidfd's process: the
    open file itself, not a path to open again (pidfd_getfd(2), Linux 5.6)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    fd = int(
        libc.syscall(
            ctypes.c_long(_SYS_PIDFD_GETFD),
            ctypes.c_int(pidfd),
            ctypes.c_int(targetfd),
            ctypes.c_uint(0),
        )
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def pidfd_pid(pidfd: int) -> int:
    """The pid (in our namespace) of the pidfd's process; -1 once it has been reaped."""
    try:
        with open(f"/proc/self/fdinfo/{pidfd}") as f:
            for line in f:
                if line.startswith("Pid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return -1
