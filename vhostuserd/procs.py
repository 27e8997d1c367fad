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
from collections.abc import Mapping, Sequence

MINIMAL_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}

_PR_SET_CHILD_SUBREAPER = 36
_DEFAULT_SIGNALS = {signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD, signal.SIGINT, signal.SIGTERM}
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
            setsigdef=_DEFAULT_SIGNALS - {signal.SIGPIPE} if keep_sigpipe_ignored else _DEFAULT_SIGNALS,
        )
    finally:
        for fd in moved.values():
            os.close(fd)


def open_devnull() -> int:
    return os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)


class Reaper:
    """Tells when children exit (pidfd readable), and reaps orphans handed to us (SIGCHLD).

    Whichever of the two sees a watched child's exit first collects its status and delivers
    it to the child's waiter; orphans re-parented to us as subreaper are simply reaped.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._watched: dict[int, asyncio.Future[int]] = {}
        self._pidfds: dict[int, int] = {}
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

    def watch(self, pid: int) -> asyncio.Future[int]:
        """Future of the raw wait status of our child ``pid`` (-1 when it cannot be known).

        Call it right after spawning, before yielding to the loop, so no sweep comes between.
        """
        fut: asyncio.Future[int] = self._loop.create_future()
        self._watched[pid] = fut
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._deliver(pid, -1)
            return fut
        self._pidfds[pid] = pidfd
        self._loop.add_reader(pidfd, self._on_pidfd, pid)
        return fut

    def _on_pidfd(self, pid: int) -> None:
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            got, status = pid, -1
        if got == pid:
            self._deliver(pid, status)

    def _deliver(self, pid: int, status: int) -> None:
        pidfd = self._pidfds.pop(pid, None)
        if pidfd is not None:
            self._loop.remove_reader(pidfd)
            os.close(pidfd)
        fut = self._watched.pop(pid, None)
        if fut is not None and not fut.done():
            fut.set_result(status)

    def _sweep(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self._watched:
                self._deliver(pid, status)


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
    try:
        os.killpg(pgid, sig)
    except OSError as e:
        if e.errno not in (errno.ESRCH, errno.EPERM):
            raise
