"""Who may do what, decided from plain facts: the quotas, who may manage whose backend, the
identity a backend runs as, which device and socket a Spawn may pass on, what polkit is asked
(docs/contract.md section 3, polkit actions) and the bounds of a Resolve.

Pure: the edges gather the facts (`edges.sockets`, `edges.trust`), these functions decide,
and the bus acts on the answer, asking polkit (through `edges.authority`) where a rule says to.
A refusal is returned as the message of its error (named in each docstring), which the caller
raises as that `core.errors.Err`; where the name depends on the case (`polkit_verdict`) or is
fixed (`untrusted_refusal`), as the `BrokerError` itself.
"""

from __future__ import annotations

import shlex
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from vhostuserd.core.descriptors import ERROR, Descriptor, Diagnostic
from vhostuserd.core.errors import BrokerError, Err, InteractionRequired
from vhostuserd.core.options import SpawnPlan
from vhostuserd.core.optiontable import CONNECTED, DEVICE_OPTIONS, LISTENING, OPTIONS

# The polkit actions (share/polkit-1/actions/org.vhostuserd.policy).
SPAWN = "org.vhostuserd.spawn"
SPAWN_DEVICE = "org.vhostuserd.spawn-device"
MANAGE = "org.vhostuserd.manage"

SETPRIV = "/usr/bin/setpriv"  # util-linux: how a backend gets its identity (`RunAs`)

# What one request may carry and one error may say (docs/threat-model.md, "Bounded replies"):
# no reply may grow with what a caller sends, or a caller that never reads its replies makes
# the daemon queue megabytes for it.
MAX_FEATURES = 64
MAX_FEATURE_BYTES = 128


@dataclass(frozen=True, slots=True)
class Ask:
    """Ask polkit whether the caller may ``action``, with ``details`` (what admins' rules
    match on); ``refusal`` is the NotAuthorized message for a no ("" where a no means doing
    less rather than failing)."""

    action: str
    details: dict[str, str]
    refusal: str = ""


# ---- authorization: who is asked at all


def consults_polkit(*, system: bool, uid: int) -> bool:
    """Whether polkit decides for this caller: on the system service, for all but root (a
    session service has no polkit, and root needs no check)."""
    return system and uid != 0


def session_refusal(action: str, *, uid: int, daemon_uid: int) -> str | None:
    """A session service acts for its own uid only: why ``uid`` may not ``action`` there
    (NotAuthorized), or None."""
    if uid == daemon_uid:
        return None
    return f"{action}: this session service acts for uid {daemon_uid} only, not uid {uid}"


def polkit_verdict(
    action: str, *, uid: int, authorized: bool, challenge: bool, interactive: bool
) -> BrokerError | None:
    """What polkit's CheckAuthorization answer means for the call: None when it may go on, else
    the error to raise. A challenge (polkit would ask for a password) is INTERACTIVE_REQUIRED:
    the caller is told to allow interaction, or, when it did, that no agent was there to ask."""
    if authorized:
        return None
    if challenge and interactive:
        return InteractionRequired(
            f"{action}: authentication is required, and no polkit "
            "authentication agent was there to ask for it"
        )
    if challenge:
        return InteractionRequired(
            f"{action}: authentication is required; call again with "
            "interactive authorization allowed (e.g. busctl --allow-interactive-authorization)"
        )
    return BrokerError(Err.NOT_AUTHORIZED, f"{action}: not authorized for uid {uid}")


# ---- quotas


@dataclass(frozen=True, slots=True)
class Quota:
    """How many backends may run at once: per uid (--max-backends-per-user) and in all
    (--max-backends)."""

    per_uid: int
    total: int


def quota_error(quota: Quota, uid: int, backends: Iterable[tuple[int, bool]]) -> str | None:
    """Why ``uid`` may not start one more backend (QuotaExceeded), or None. ``backends``: the
    owner uid of each backend the daemon has, and whether it has exited. Every backend that
    has not exited counts, a stopping one too (it holds its resources until it is gone); the
    daemon's total is checked first."""
    owners = [owner for owner, exited in backends if not exited]
    if len(owners) >= quota.total:
        return f"{quota.total} backends are running, the most this daemon runs"
    if owners.count(uid) >= quota.per_uid:
        return f"uid {uid} already runs {quota.per_uid} backends, its quota"
    return None


# ---- managing backends


class Owned(Protocol):
    """What the manage rule needs of a backend (`edges.backend.Backend` has it)."""

    @property
    def id(self) -> str: ...
    @property
    def descriptor(self) -> str: ...
    @property
    def binary(self) -> str: ...
    @property
    def owner_uid(self) -> int: ...


def ask_to_manage(uid: int, b: Owned, verb: str) -> Ask | None:
    """Whether ``uid`` may ``verb`` (stop it, read its log) backend ``b``: None when it may
    outright (its owner uid, and root), else what polkit is asked (org.vhostuserd.manage)."""
    if uid in (0, b.owner_uid):
        return None
    details = {
        "descriptor": b.descriptor,
        "binary": b.binary,
        "backend": b.id,
        "owner-uid": str(b.owner_uid),
    }
    refusal = f"{MANAGE}: backend {b.id} belongs to uid {b.owner_uid}; uid {uid} may not {verb}"
    return Ask(MANAGE, details, refusal)


def ask_to_see_all(uid: int, owners: Iterable[int]) -> Ask | None:
    """Whether ``uid`` sees every backend whole (ListBackends, the system service's per-caller
    view of the objects): None when it does without asking (root, or no other user's backend
    is there to see), else what polkit is asked; a no leaves the caller its own."""
    if uid == 0 or all(owner == uid for owner in owners):
        return None
    return Ask(MANAGE, {"list": "all"})


def ask_to_reload() -> Ask:
    """Reload rescans every directory: org.vhostuserd.manage."""
    return Ask(MANAGE, {"request": "reload"})


# ---- Spawn: what polkit is asked, and as whom the backend runs


def ask_to_spawn(
    d: Descriptor, p: SpawnPlan, *, idmap_mode: str | None, app_id: str | None
) -> tuple[Ask, ...]:
    """What polkit is asked before ``d`` runs with plan ``p``: org.vhostuserd.spawn, and
    spawn-device as well when a device is passed on, with the same details: the descriptor, its
    type and binary, the path options, the id-mapping mode in effect (asked for or not), the
    admin-vetted extra options and the arguments they add, and the caller's Flatpak app id."""
    details = {"descriptor": d.name, "type": d.type, "binary": d.binary}
    for key in ("render-node", "evdev-path", "shared-dir", "blk-file"):
        if key in p.values:
            details[key] = str(p.values[key])
    if idmap_mode is not None:
        details["idmap"] = idmap_mode
    for key, value in p.values.items():  # the admin-vetted extra options (`extras`)
        if key not in details and key not in OPTIONS:
            flag = isinstance(value, bool)
            details[key] = ("true" if value else "false") if flag else str(value)
    if p.extra_args:
        details["extra-args"] = shlex.join(p.extra_args)
    if app_id:
        details["flatpak-app-id"] = app_id
    actions = (SPAWN, SPAWN_DEVICE) if p.device_paths else (SPAWN,)
    return tuple(Ask(action, details) for action in actions)


@dataclass(frozen=True, slots=True)
class Account:
    """A user's entry in the user database: primary group and every group it is in."""

    gid: int
    groups: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class RunAs:
    """The identity a backend runs as; ``switch`` says whether that is another user than the
    daemon's. An empty `exec_prefix`: as the daemon itself."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    no_new_privs: bool
    switch: bool

    def exec_prefix(self) -> tuple[str, ...]:
        if not self.switch and not self.no_new_privs:
            return ()
        prefix = [SETPRIV]
        if self.switch:
            groups = ",".join(str(g) for g in self.groups) or str(self.gid)
            prefix += [f"--reuid={self.uid}", f"--regid={self.gid}", f"--groups={groups}"]
        if self.no_new_privs:
            prefix.append("--no-new-privs")
        return (*prefix, "--")


def run_as(
    uid: int,
    device_gids: tuple[int, ...] = (),
    *,
    system: bool,
    daemon: tuple[int, int],
    account: Account | None,
) -> RunAs:
    """As whom a backend of caller ``uid`` runs. A session service runs it as itself
    (``daemon``: its uid and gid). The system service runs it as the caller, with no_new_privs
    (root's too): the caller's primary group and groups from its ``account`` (a uid without one,
    a container's say, gets its own group only), plus the group of each device passed on."""
    daemon_uid, daemon_gid = daemon
    if not system:
        return RunAs(daemon_uid, daemon_gid, (), False, switch=False)
    gid, groups = (account.gid, account.groups) if account is not None else (uid, (uid,))
    all_groups = tuple(dict.fromkeys([*groups, *device_gids]))
    return RunAs(uid, gid, all_groups, True, switch=uid != daemon_uid)


# ---- what a Spawn passes on: devices and the socket


def device_error(option: str, value: str, real: str, node: int | str) -> str | None:
    """Why device option ``option`` = ``value`` is refused (InvalidOption), or None. ``real``
    is the path it resolves to, which is what counts and what the backend is given (a symlink
    the caller controls could point elsewhere by the time the backend opens it); ``node`` its
    st_mode, or why it could not be stat'ed. It must lie in the option's directory (/dev/dri/
    for render-node, /dev/input/ for evdev-path) and be a character device."""
    prefix = DEVICE_OPTIONS[option]
    if not real.startswith(prefix):
        return f"option '{option}': {value} is not under {prefix}"
    if isinstance(node, str):
        return f"option '{option}': {value}: {node}"
    if not stat.S_ISCHR(node):
        return f"option '{option}': {value} is not a character device"
    return None


@dataclass(frozen=True, slots=True)
class SocketFacts:
    """What `edges.sockets` learnt of the fd a Spawn carries, step by step: a step that failed
    says why, and nothing after it is known (the defaults describe a good socket)."""

    unusable: str | None = None  # fcntl or fstat failed: why
    o_path: bool = False
    file_type: str = "socket"  # "socket", "fifo" or "other", from fstat
    uninspectable: str | None = None  # no socket object could be made of it: why
    unix: bool = True  # its family is AF_UNIX
    family: int = 0  # its family's number, for the message when it is not
    stype: str = "SOCK_STREAM"  # its type's name (or number)
    listening: bool = False
    connected: bool = False


def socket_error(f: SocketFacts) -> str | None:
    """Why the socket argument is refused (InvalidSocket), or None: vhost-user needs an
    AF_UNIX SOCK_STREAM socket (not an O_PATH fd), connected or listening."""
    if f.unusable is not None:
        return f"the socket argument is not a usable fd: {f.unusable}"
    if f.o_path:
        return "the socket argument is an O_PATH fd; pass the socket itself"
    if f.file_type != "socket":
        kind = "a pipe" if f.file_type == "fifo" else "not a socket"
        return f"the socket argument is {kind}; an AF_UNIX SOCK_STREAM socket is needed"
    if f.uninspectable is not None:
        return f"the socket argument cannot be inspected: {f.uninspectable}"
    if not f.unix:
        return f"the socket argument is of family {f.family}; AF_UNIX is needed"
    if f.stype != "SOCK_STREAM":
        return f"the socket argument is {f.stype}; vhost-user needs SOCK_STREAM"
    if not f.listening and not f.connected:
        return (
            "the socket argument is neither connected nor listening; pass one "
            "end of a socketpair or a bound, listening socket, as the backend needs"
        )
    return None


def socket_kind_error(d: Descriptor, kind: str | None, listening: bool) -> str | None:
    """Why a (listening or connected) socket is the wrong kind for ``d``, whose backends take
    ``kind`` (`options.socket_kind_of`; None: either), or None when it fits (InvalidSocket)."""
    if kind == CONNECTED and listening:
        return (
            f"{d.name} is a {d.type} backend: it serves the socket it is given, so it needs a "
            "connected socket (one end of a socketpair), not a listening one"
        )
    if kind == LISTENING and not listening:
        return (
            f"{d.name} is a {d.type} backend: it accepts its front-end on the socket, so it "
            "needs a listening socket (bind + listen), not a connected one"
        )
    return None


# ---- Resolve


def features_error(features: list[str]) -> str | None:
    """Why a requested feature list is refused (LimitsExceeded), or None. Says how much was
    sent, never what: echoing it is what made an error as large as the call."""
    if len(features) > MAX_FEATURES:
        return f"{len(features)} features requested; at most {MAX_FEATURES} may be"
    for i, f in enumerate(features):
        if len(f.encode("utf-8", "surrogateescape")) > MAX_FEATURE_BYTES:
            return (
                f"feature #{i} is {len(f)} characters long; at most {MAX_FEATURE_BYTES} bytes each"
            )
    return None


# ---- trusted binaries (the system service runs only root's programs, reached through root's
# directories: `vhostuserd.edges.trust.untrusted_reason` walks the path and asks this)


def untrusted_step(path: str, binary: str, *, uid: int, mode: int, last: bool) -> str | None:
    """Why one step on the way to ``binary`` (a directory, a symlink or the binary itself, its
    owner and mode as lstat says) makes it untrusted, or None. A sticky directory such as /tmp
    may be writable by others, except as the last step."""
    if uid != 0:
        return f"{path} (on the way to {binary}) is owned by uid {uid}, not root"
    sticky_dir = stat.S_ISDIR(mode) and mode & stat.S_ISVTX
    if mode & 0o022 and not (sticky_dir and not last):
        return f"{path} (on the way to {binary}) is group- or world-writable"
    return None


def untrusted_diagnostics(
    descriptors: Iterable[Descriptor], reason: Callable[[str], str | None]
) -> tuple[Diagnostic, ...]:
    """The system service's diagnostics for descriptors whose binary it will not run."""
    out = []
    for d in descriptors:
        why = reason(d.binary)
        if why is not None:
            out.append(Diagnostic(d.path, ERROR, f"/binary: not run by the system service: {why}"))
    return tuple(out)


def untrusted_refusal(name: str, why: str) -> BrokerError:
    """Spawn of descriptor ``name`` on the system service, whose binary is untrusted."""
    return BrokerError(
        Err.NOT_AUTHORIZED, f"{name}: its binary cannot be trusted by the system service: {why}"
    )


# ---- respawn (options.conf ``respawn = N T``: at most N restarts in any T seconds)


def recent_restarts(times: Iterable[float], now: float, window_s: float) -> list[float]:
    """The restart times (oldest first) that still count against the budget at ``now``: a
    backend may be restarted again while fewer than N of them are left."""
    return [t for t in times if now - t <= window_s]
