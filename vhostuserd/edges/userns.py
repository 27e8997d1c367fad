"""Backends in a user namespace of their own, with the caller as its root (issue 13).

Debian 12's virtiofsd needs "root" to build its sandbox (it drops supplementary groups,
unshares PID and mount namespaces, pivots its root): as the caller it fails. Run in a new
user namespace whose uid 0 and gid 0 are the caller's uid and gid, it gets exactly that, and
nothing outside: its capabilities are those of the namespace, which covers only the caller's
own ids (and, with ``idmap=subids``, the caller's range from /etc/subuid and /etc/subgid), so
files the guest creates belong to the caller and a compromised backend is the caller, not
host root.

The decisions are `vhostuserd.core.userns_policy`'s (which descriptors get a namespace, which
``idmap`` mode, the map text). Here:

* `plan_for` reads the admin's userns.conf, /etc/subuid and /etc/subgid and the user
  database, and applies the decisions to one Spawn.
* The launch (`create`), with no setuid helper and no Python between fork and exec: a
  holder, ``unshare --user --mount -- cat``, is started with posix_spawn; once it echoes a
  byte back (so the namespaces exist) the daemon writes its ``uid_map``, ``setgroups``
  (``deny``) and ``gid_map`` itself, opens the two namespaces and lets the holder go (EOF on
  its stdin). The backend is then started as ``setpriv --clear-groups --no-new-privs --
  nsenter --user=/proc/self/fd/4 --mount=/proc/self/fd/5 --setuid=0 --setgid=0 -- /bin/sh -c
  'exec "$0" "$@" 4<&- 5<&-' BACKEND ...``: nsenter joins the namespaces (the ns fds are the
  child's fds 4 and 5, closed again by the shell before the backend runs) and becomes uid 0
  there, which is the caller outside; the backend's exec as that uid 0 gives it the
  namespace's capabilities and no others. newuidmap/newgidmap are never run.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import select
import signal
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from vhostuserd.core import sysconf
from vhostuserd.core.errors import Err
from vhostuserd.core.lookup import SUBDIR, Directory
from vhostuserd.core.userns_policy import (
    CALLER,
    CONFIG,
    SUBGID,
    SUBUID,
    IdMap,
    UsernsError,
    id_map,
    namespace_for,
    parse_config,
    policy,
)
from vhostuserd.edges import procs, settings

UNSHARE, NSENTER, SETPRIV, SH = (
    "/usr/bin/unshare",
    "/usr/bin/nsenter",
    "/usr/bin/setpriv",
    "/bin/sh",
)
USER_FD, MNT_FD = 4, 5
HOLDER_TIMEOUT_S = 5.0


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def primary_gid(uid: int) -> int:
    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        return uid


def load_config(sysconfdir: str) -> tuple[dict[str, dict[str, str]], str]:
    try:
        text, path = settings.read(sysconfdir, CONFIG)
    except sysconf.SysconfError as e:
        raise UsernsError(Err.SPAWN_FAILED, str(e)) from None
    return ({} if text is None else parse_config(text, path)), path


def _read_subids(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(1 << 20)
    except FileNotFoundError:
        return ""
    except OSError as e:
        raise UsernsError(Err.SPAWN_FAILED, f"{path}: {e.strerror}") from None


def plan_for(
    *, system: bool, dtype: str, name: str, requested: str | None, uid: int, sysconfdir: str
) -> IdMap | None:
    """The map a spawn of descriptor ``name`` by ``uid`` gets, or None for no namespace: the
    admin's file and the user database read here, decided by `userns_policy.namespace_for`."""
    config, path = load_config(sysconfdir)
    p = policy(dtype, name, config, path)
    mode = namespace_for(
        p, system=system, daemon_uid=os.getuid(), uid=uid, requested=requested, name=name
    )
    if mode is None:
        return None
    if not system:
        return id_map(CALLER, os.getuid(), os.getgid(), user_name(os.getuid()), "", "")
    gid = primary_gid(uid)
    if mode == CALLER:
        return id_map(mode, uid, gid, user_name(uid), "", "")
    return id_map(mode, uid, gid, user_name(uid), _read_subids(SUBUID), _read_subids(SUBGID))


def unprivileged_userns_reason() -> str | None:
    """Why this kernel refuses (unprivileged) user namespaces, if a sysctl says so: Debian's
    kernel.unprivileged_userns_clone, or user.max_user_namespaces (per user namespace)."""
    for path, bad in (
        ("/proc/sys/kernel/unprivileged_userns_clone", "0"),
        ("/proc/sys/user/max_user_namespaces", "0"),
    ):
        try:
            with open(path) as f:
                if f.read().strip() == bad:
                    return f"{path} is {bad}"
        except OSError:
            continue
    return None


# ---------------------------------------------------------------- the launch


@dataclass
class Namespace:
    """A user namespace (and its mount namespace) with its maps written, held by two fds of
    ours until the backend has been started in it (`close`)."""

    fds: dict[int, int]  # {child fd number: our fd}
    prefix: tuple[str, ...]
    idmap: IdMap

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}


def exec_prefix(*, privileged: bool) -> tuple[str, ...]:
    """What runs the backend inside the namespace passed as fds 4 and 5 (see the module
    docstring). Unprivileged (the session service), the groups cannot be cleared: they stay
    the daemon's, shown as the overflow gid inside."""
    # Root is uid 0 outside too, and unmapped inside: nsenter becomes the namespace's 0 (the
    # caller outside). The unprivileged daemon's ids already are the namespace's 0 (its one
    # mapped uid and gid): nothing to change, and nsenter could not drop groups under "deny".
    groups, ids = (
        (("--clear-groups",), ("--setuid=0", "--setgid=0"))
        if privileged
        else ((), ("--preserve-credentials",))
    )
    return (
        SETPRIV,
        *groups,
        "--no-new-privs",
        "--",
        NSENTER,
        f"--user=/proc/self/fd/{USER_FD}",
        f"--mount=/proc/self/fd/{MNT_FD}",
        *ids,
        "--",
        SH,
        "-c",
        f'exec "$0" "$@" {USER_FD}<&- {MNT_FD}<&-',
    )


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def create(idmap: IdMap, timeout: float = HOLDER_TIMEOUT_S) -> Namespace:
    """Make the namespaces and write their maps; raises UsernsError (SpawnFailed) saying why."""
    in_r, in_w = os.pipe2(os.O_CLOEXEC)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = -1
    ours: list[int] = []
    try:
        try:
            pid = procs.spawn(
                [UNSHARE, "--user", "--mount", "--", "/bin/cat"], fds={0: in_r, 1: out_w, 2: err_w}
            )
        except OSError as e:
            raise UsernsError(Err.SPAWN_FAILED, f"cannot run {UNSHARE}: {e.strerror}") from None
        finally:
            for fd in (in_r, out_w, err_w):
                os.close(fd)
        with contextlib.suppress(BrokenPipeError):  # unshare failed at once: stderr says why
            os.write(in_w, b"x")
        ready, _, _ = select.select([out_r], [], [], timeout)
        echoed = os.read(out_r, 1) if ready else b""
        if echoed != b"x":
            os.set_blocking(err_r, False)
            try:
                why = os.read(err_r, 4096).decode("utf-8", "replace").strip()
            except BlockingIOError:
                why = ""
            if not why:
                why = f"{UNSHARE} gave no sign of life in {timeout:g} s"
            if (reason := unprivileged_userns_reason()) is not None:
                why += f" (user namespaces are disabled here: {reason})"
            raise UsernsError(
                Err.SPAWN_FAILED, f"cannot create a user namespace for the backend: {why}"
            )
        try:
            _write(f"/proc/{pid}/uid_map", idmap.uid_map)
            _write(f"/proc/{pid}/setgroups", "deny")
            _write(f"/proc/{pid}/gid_map", idmap.gid_map)
            ours.append(os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC))
            ours.append(os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC))
        except OSError as e:
            for fd in ours:
                os.close(fd)
            raise UsernsError(
                Err.SPAWN_FAILED,
                f"cannot map ids in the backend's user namespace: {e.filename}: {e.strerror}",
            ) from None
        return Namespace(
            {USER_FD: ours[0], MNT_FD: ours[1]}, exec_prefix(privileged=os.getuid() == 0), idmap
        )
    finally:
        os.close(in_w)  # EOF: the holder's cat exits
        os.close(out_r)
        os.close(err_r)
        if pid > 0:
            _reap(pid)


def _reap(pid: int) -> None:
    """The holder is our child and exits at EOF: wait for it (SIGKILL after a second)."""
    deadline = time.monotonic() + 1.0
    while True:
        try:
            got, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if got == pid:
            return
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)  # our unreaped child: the pid is still its own
            os.waitpid(pid, 0)
            return
        time.sleep(0.0005)


@contextlib.contextmanager
def launch(
    idmap: IdMap | None, plain: tuple[str, ...]
) -> Iterator[tuple[tuple[str, ...], dict[int, int]]]:
    """(exec prefix, extra fds) to start a backend with: ``plain`` and none without a map,
    else a fresh namespace's, whose fds are closed once the backend has been started."""
    if idmap is None:
        yield plain, {}
        return
    ns = create(idmap)
    try:
        yield ns.prefix, ns.fds
    finally:
        ns.close()


def sysconfdir_of(dirs: Iterable[Directory]) -> str:
    """The sysconf tier's root (``/etc`` for ``/etc/qemu/vhost-user``)."""
    for d in dirs:
        if d.tier == "sysconf" and d.path.endswith("/" + SUBDIR):
            return d.path[: -len(SUBDIR) - 1] or "/"
    return "/etc"
