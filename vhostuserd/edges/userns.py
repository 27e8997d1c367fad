"""Backends in a user namespace of their own, with the caller as its root (issue 13).

Debian 12's virtiofsd needs "root" to build its sandbox (it drops supplementary groups,
unshares PID and mount namespaces, pivots its root): as the caller it fails. Run in a new
user namespace whose uid 0 and gid 0 are the caller's uid and gid, it gets exactly that, and
nothing outside: its capabilities are those of the namespace, which covers only the caller's
own ids (and, with ``idmap=subids``, the caller's range from /etc/subuid and /etc/subgid), so
files the guest creates belong to the caller and a compromised backend is the caller, not
host root.

Two halves:

* Pure policy (`parse_config`, `policy`, `choose_mode`, `subid_range`, `id_map`: no I/O):
  which descriptors get a namespace (the descriptor's type, ``fs`` by default, and the
  admin's ``SYSCONFDIR/vhostuserd/userns.conf``, never a client string), which ``idmap``
  mode applies (``caller`` | ``subids``, the admin may forbid or force one), and the
  uid_map/gid_map text. `plan_for` reads the files and applies it to one Spawn (a root
  caller, and a root session service, get no namespace unless asked).
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
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from vhostuserd.core import sysconf
from vhostuserd.core.errors import BrokerError, Err
from vhostuserd.core.lookup import SUBDIR, Directory
from vhostuserd.core.optiontable import IDMAP_MODES as OPTION_MODES
from vhostuserd.edges import procs, settings

CALLER, SUBIDS = "caller", "subids"
IDMAP_MODES = OPTION_MODES  # the `idmap` Spawn option's values
CONFIG = "vhostuserd/userns.conf"  # under the sysconf tier's root (default /etc)
# Types that get a namespace unless the admin says otherwise. gpu and input backends run
# plainly as the caller: they need the caller's groups (render, input) and no "root".
DEFAULT_TYPES = frozenset({"fs"})
SUBUID, SUBGID = "/etc/subuid", "/etc/subgid"
UNSHARE, NSENTER, SETPRIV, SH = (
    "/usr/bin/unshare",
    "/usr/bin/nsenter",
    "/usr/bin/setpriv",
    "/bin/sh",
)
USER_FD, MNT_FD = 4, 5
HOLDER_TIMEOUT_S = 5.0
_TRUE, _FALSE = ("yes", "true", "on", "1"), ("no", "false", "off", "0")


class UsernsError(BrokerError):
    """A namespace that cannot be had (SpawnFailed, or NotAuthorized and InvalidOption for what
    the caller asked)."""


# ---------------------------------------------------------------- policy (pure)


@dataclass(frozen=True, slots=True)
class Policy:
    """Whether a descriptor's backends run in a user namespace, and the idmap modes allowed
    there (the first is the default); ``source`` says which setting decided."""

    enabled: bool
    modes: tuple[str, ...]
    source: str


def parse_config(text: str, path: str) -> dict[str, dict[str, str]]:
    """The admin's settings: ``[type:TYPE]`` and ``[DESCRIPTOR-NAME]`` sections with
    ``userns = yes|no`` and ``idmap = MODE [MODE]`` (the modes allowed, the first the default).
    Raises UsernsError naming the file, the section and the key for anything else."""
    try:
        sections = sysconf.parse(text, path)
    except sysconf.SysconfError as e:
        raise UsernsError(Err.SPAWN_FAILED, str(e)) from None
    for section, values in sections.items():
        for key, value in values.items():
            if key == "userns":
                if value.lower() not in (*_TRUE, *_FALSE):
                    raise UsernsError(
                        Err.SPAWN_FAILED, f"{path}: [{section}] userns = {value!r}: yes or no"
                    )
            elif key == "idmap":
                modes = value.split()
                bad = [m for m in modes if m not in IDMAP_MODES]
                if not modes or bad or len(set(modes)) != len(modes):
                    raise UsernsError(
                        Err.SPAWN_FAILED,
                        f"{path}: [{section}] idmap = {value!r}: one or both of "
                        f"{', '.join(IDMAP_MODES)}, each once",
                    )
            else:
                raise UsernsError(
                    Err.SPAWN_FAILED, f"{path}: [{section}] {key}: unknown setting (userns, idmap)"
                )
    return sections


def policy(
    dtype: str, name: str, config: Mapping[str, Mapping[str, str]], path: str = CONFIG
) -> Policy:
    """The policy for descriptor ``name`` of type ``dtype``: built-in defaults, then the
    ``[type:TYPE]`` section, then the descriptor's own section, each key overriding."""
    enabled, source = dtype in DEFAULT_TYPES, "built-in default"
    modes: tuple[str, ...] = (CALLER, SUBIDS)
    for section in sysconf.sections_for(dtype, name):
        values = config.get(section, {})
        if "userns" in values:
            enabled, source = values["userns"].lower() in _TRUE, f"{path} [{section}]"
        if "idmap" in values:
            modes, source = tuple(values["idmap"].split()), f"{path} [{section}]"
    return Policy(enabled, modes, source)


def choose_mode(p: Policy, requested: str | None, name: str) -> str:
    """The idmap mode a spawn gets: the request if the admin allows it, else the default."""
    if requested is None:
        return p.modes[0]
    if requested not in p.modes:
        raise UsernsError(
            Err.NOT_AUTHORIZED,
            f"option 'idmap': {requested} is not allowed for {name} by "
            f"{p.source} (allowed: {' '.join(p.modes)})",
        )
    return requested


def subid_range(text: str, user: str, uid: int) -> tuple[int, int] | None:
    """The first ``start, count`` of ``user`` (by name or uid) in /etc/subuid-format text."""
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) != 3 or parts[0] not in (user, str(uid)):
            continue
        try:
            start, count = int(parts[1]), int(parts[2])
        except ValueError:
            continue
        if start > 0 and count > 0 and start + count <= 1 << 32:
            return start, count
    return None


@dataclass(frozen=True, slots=True)
class IdMap:
    mode: str
    uid_map: str
    gid_map: str


def id_map(
    mode: str,
    uid: int,
    gid: int,
    user: str,
    subuid: str,
    subgid: str,
    *,
    subuid_path: str = SUBUID,
    subgid_path: str = SUBGID,
) -> IdMap:
    """uid_map/gid_map text: ``caller``: 0 is the caller, nothing else is mapped; ``subids``:
    also 1..N to the caller's range (the first one listed for the user)."""
    own_u, own_g = f"0 {uid} 1\n", f"0 {gid} 1\n"
    if mode == CALLER:
        return IdMap(mode, own_u, own_g)
    ranges = []
    for path, text in ((subuid_path, subuid), (subgid_path, subgid)):
        r = subid_range(text, user, uid)
        if r is None:
            raise UsernsError(
                Err.NOT_AUTHORIZED,
                f"option 'idmap': subids: {path} has no range for user {user} "
                f"(uid {uid}); ask the administrator for one, or use idmap=caller",
            )
        ranges.append(r)
    (us, uc), (gs, gc) = ranges
    if us <= uid < us + uc or gs <= gid < gs + gc:
        raise UsernsError(
            Err.NOT_AUTHORIZED,
            f"option 'idmap': subids: the range of user {user} in {subuid_path} "
            f"or {subgid_path} contains the user's own uid or gid",
        )
    return IdMap(mode, f"{own_u}1 {us} {uc}\n", f"{own_g}1 {gs} {gc}\n")


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
    """The map a spawn of descriptor ``name`` by ``uid`` gets, or None for no namespace.

    A root caller of the system service gets one only when it asks (``idmap``). The session
    service acts for its own uid: it gives a namespace only when it is not root (a root
    session service runs virtiofsd as root, as before), and only ``caller`` (an
    unprivileged process may write a one-line map of its own ids only)."""
    config, path = load_config(sysconfdir)
    p = policy(dtype, name, config, path)
    if not p.enabled:
        if requested is not None:
            raise UsernsError(
                Err.INVALID_OPTION,
                f"option 'idmap': {name} runs without a user namespace ({p.source})",
            )
        return None
    mode = choose_mode(p, requested, name)
    if not system:
        if os.getuid() == 0:
            if requested is not None:
                raise UsernsError(
                    Err.INVALID_OPTION,
                    "option 'idmap': this session service runs as root, "
                    "and its backends run as root without a user namespace",
                )
            return None
        if mode != CALLER:
            raise UsernsError(
                Err.NOT_AUTHORIZED,
                "option 'idmap': subids needs the system service (only root "
                "may map a range from /etc/subuid); this session service can map only its "
                "own uid (idmap=caller)",
            )
        return id_map(CALLER, os.getuid(), os.getgid(), user_name(os.getuid()), "", "")
    if uid == 0 and requested is None:
        # Root needs no "root": a namespace mapping only uid 0 would make every other
        # owner's files in the share unreachable. Root gets one only when it asks for it.
        return None
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
