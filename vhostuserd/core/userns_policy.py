"""Which backends run in a user namespace of their own, and with which id mapping (issue 13;
the launch is `vhostuserd.edges.userns`). Pure: no I/O.

Which descriptors get a namespace: the descriptor's type (``fs`` by default) and the admin's
``SYSCONFDIR/vhostuserd/userns.conf``, never a client string (`parse_config`, `policy`); which
``idmap`` mode applies (``caller`` | ``subids``; the admin may forbid or force one:
`choose_mode`), whether this Spawn gets one at all (`namespace_for`: a root caller, and a root
session service, get none unless asked), and the uid_map/gid_map text (`subid_range`,
`id_map`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from vhostuserd.core import sysconf
from vhostuserd.core.errors import BrokerError, Err
from vhostuserd.core.optiontable import IDMAP_MODES as OPTION_MODES

CALLER, SUBIDS = "caller", "subids"
IDMAP_MODES = OPTION_MODES  # the `idmap` Spawn option's values (= optiontable.IDMAP_MODES)
CONFIG = "vhostuserd/userns.conf"  # under the sysconf tier's root (default /etc)
# Types that get a namespace unless the admin says otherwise. gpu and input backends run
# plainly as the caller: they need the caller's groups (render, input) and no "root".
DEFAULT_TYPES = frozenset({"fs"})
SUBUID, SUBGID = "/etc/subuid", "/etc/subgid"
_TRUE, _FALSE = ("yes", "true", "on", "1"), ("no", "false", "off", "0")


class UsernsError(BrokerError):
    """A namespace that cannot be had (SpawnFailed, or NotAuthorized and InvalidOption for what
    the caller asked)."""


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


def namespace_for(
    p: Policy, *, system: bool, daemon_uid: int, uid: int, requested: str | None, name: str
) -> str | None:
    """The idmap mode a spawn of descriptor ``name`` by ``uid`` gets, or None for no namespace.

    A root caller of the system service gets one only when it asks (``idmap``). The session
    service acts for its own uid: it gives a namespace only when it is not root (a root
    session service runs virtiofsd as root, as before), and only ``caller`` (an
    unprivileged process may write a one-line map of its own ids only)."""
    if not p.enabled:
        if requested is not None:
            raise UsernsError(
                Err.INVALID_OPTION,
                f"option 'idmap': {name} runs without a user namespace ({p.source})",
            )
        return None
    mode = choose_mode(p, requested, name)
    if not system:
        if daemon_uid == 0:
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
        return CALLER
    if uid == 0 and requested is None:
        # Root needs no "root": a namespace mapping only uid 0 would make every other
        # owner's files in the share unreachable. Root gets one only when it asks for it.
        return None
    return mode
