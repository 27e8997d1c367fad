"""What the system service checks on the host before it runs a backend for a caller: the facts
of `core.policy`'s rules that only the system has.

A descriptor's binary must be reached through root's files only (`untrusted_reason` walks the
path, symlinks included, and asks `policy.untrusted_step` of each step), a device option's
node must be the character device the option allows (`check_device`), and the backend runs
as the caller with the caller's groups from the user database (`run_as`, applied through
util-linux's setpriv).
"""

from __future__ import annotations

import os
import pwd
import stat

from vhostuserd.core import policy
from vhostuserd.core.errors import BrokerError, Err
from vhostuserd.core.policy import Account, RunAs


def untrusted_reason(binary: str) -> str | None:
    """Why a system-mode descriptor's binary must not run, or None when it may.

    Everything the kernel walks through to reach the binary must be root's: every
    directory (root-owned, not group- or world-writable, except a sticky directory such as
    /tmp before the last step) and every symlink on the way (root-owned, and checked where
    it lies, not only where it points), else whoever controls that step can swap the
    program between this check and the exec (the probe runs as root).
    """
    if not binary.startswith("/"):
        return f"{binary}: not an absolute path"
    pending = [p for p in reversed(binary.split("/")) if p]  # a stack: next component last
    current = "/"
    links = 0
    reason = _untrusted_step("/", binary, last=not pending)
    while reason is None and pending:
        name = pending.pop()
        if name == ".":
            continue
        if name == "..":
            current = os.path.dirname(current)  # already checked on the way down
            continue
        path = os.path.join(current, name)
        try:
            st = os.lstat(path)
        except OSError as e:
            return f"{path}: {e.strerror}"
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid != 0:
                return (
                    f"{path} (on the way to {binary}) is a symlink owned by uid {st.st_uid}, "
                    "not root"
                )
            links += 1
            if links > 40:
                return f"{binary}: too many levels of symbolic links"
            target = os.readlink(path)
            if target.startswith("/"):
                current = "/"
            pending.extend(p for p in reversed(target.split("/")) if p)
            continue
        reason = _untrusted_step(path, binary, last=not pending, st=st)
        current = path
    if reason is None:
        try:
            if not stat.S_ISREG(os.stat(current).st_mode):
                return f"{current} (on the way to {binary}) is not a regular file"
        except OSError as e:
            return f"{current}: {e.strerror}"
    return reason


def _untrusted_step(
    path: str, binary: str, *, last: bool, st: os.stat_result | None = None
) -> str | None:
    if st is None:
        try:
            st = os.lstat(path)
        except OSError as e:
            return f"{path}: {e.strerror}"
    return policy.untrusted_step(path, binary, uid=st.st_uid, mode=st.st_mode, last=last)


def check_device(option: str, value: str) -> tuple[str, int]:
    """The path device option ``option`` = ``value`` resolves to and the device's group, once
    `policy.device_error` allows it; InvalidOption otherwise."""
    real = os.path.realpath(value)
    try:
        st = os.stat(real)
    except OSError as e:
        node: int | str = str(e.strerror)
        gid = -1
    else:
        node, gid = st.st_mode, st.st_gid
    why = policy.device_error(option, value, real, node)
    if why is not None:
        raise BrokerError(Err.INVALID_OPTION, why)
    return real, gid


def run_as(uid: int, device_gids: tuple[int, ...] = (), *, system: bool) -> RunAs:
    """`policy.run_as` for caller ``uid``, its groups from the user database."""
    account = None
    if system:
        try:
            pw = pwd.getpwuid(uid)
            account = Account(pw.pw_gid, tuple(os.getgrouplist(pw.pw_name, pw.pw_gid)))
        except KeyError:
            pass  # no passwd entry: the policy gives it its own group only
    return policy.run_as(
        uid, device_gids, system=system, daemon=(os.getuid(), os.getgid()), account=account
    )
