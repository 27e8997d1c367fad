"""Each backend in a cgroup v2 of its own, under the daemon's own subtree.

Layout (found from ``/proc/self/cgroup``, the ``0::`` line, and the cgroup2 mount in
``/proc/self/mountinfo``):

- **delegated**: the daemon's cgroup is its own (systemd's ``Delegate=yes`` marks it with the
  ``trusted.delegate``/``user.delegate`` xattr, or nothing but the daemon runs in it). The
  daemon moves itself into the leaf ``daemon/`` (a cgroup with children holds no processes),
  enables the cpu, memory and pids controllers it is offered for its children, and puts each
  backend in ``backend-ID/``: ``/system.slice/vhostuserd.service/{daemon,backend-1,...}``.
- **nested**: the daemon shares its cgroup with others (a test runner, a shell, the root
  cgroup): it stays where it is and makes ``vhostuserd-HASH/backend-ID/`` there, HASH naming
  the state directory so that a restarted daemon finds the same subtree.
- **off**: no cgroup v2 mount, or none writable: backends run as before (their process
  group is the only boundary), and the daemon says so once at start-up.

A backend is placed before its first instruction runs: the process the daemon spawns is a
launcher (``/bin/sh``, no fork) that writes ``0`` to the cgroup's ``cgroup.procs`` (itself)
and then execs the rest of the command line (setpriv, the backend), so whatever it forks
later is born inside. Stopping ends the whole cgroup with ``cgroup.kill``.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
from dataclasses import dataclass, field

from vhostuserd.core import sysconf
from vhostuserd.core.errors import BrokerError, Err
from vhostuserd.core.units import format_bytes, format_usec
from vhostuserd.edges import settings

log = logging.getLogger("vhostuserd.cgroup")

LAUNCHER_SH = "/bin/sh"
# $0 is the cgroup.procs file, the rest the command: moved first, then exec'd in place.
_LAUNCH = (
    'echo 0 >"$0" || { echo "vhostuserd: cannot enter its cgroup $0" >&2; exit 127; }; '
    'unset PWD; exec "$@"'
)
CONTROLLERS = ("cpu", "memory", "pids")
# The admin's limits, SYSCONFDIR/vhostuserd/cgroup.conf: setting -> (cgroup file, controller).
CONFIG = "vhostuserd/cgroup.conf"
LIMIT_FILES = {
    "memory-max": ("memory.max", "memory"),
    "tasks-max": ("pids.max", "pids"),
    "cpu-weight": ("cpu.weight", "cpu"),
}
_SIZE = re.compile(r"([0-9]+)([KMGT]?)")


class LimitsError(BrokerError):
    """The admin's cgroup.conf is wrong (SpawnFailed); the message names the file, section and
    setting."""

    def __init__(self, message: str) -> None:
        super().__init__(Err.SPAWN_FAILED, message)


def _limit_value(key: str, value: str, where: str) -> str:
    """The text to write to the cgroup file for one setting, or LimitsError."""
    v = value.strip()
    if key == "cpu-weight":
        if v.isdigit() and 1 <= int(v) <= 10000:
            return v
        raise LimitsError(f"{where} {key} = {value!r}: a number from 1 to 10000 (cpu.weight)")
    if v == "max":
        return v
    if key == "tasks-max":
        if v.isdigit() and int(v) > 0:
            return v
        raise LimitsError(f"{where} {key} = {value!r}: a number of tasks, or max")
    m = _SIZE.fullmatch(v.upper())
    if m is None or int(m.group(1)) == 0:
        raise LimitsError(
            f"{where} {key} = {value!r}: bytes with an optional K, M, G or T suffix, or max"
        )
    return str(int(m.group(1)) << (10 * " KMGT".index(m.group(2) or " ")))


def parse_limits(text: str, path: str) -> dict[str, dict[str, str]]:
    """``[type:TYPE]`` and ``[DESCRIPTOR-NAME]`` sections of memory-max, tasks-max and
    cpu-weight; the values as the cgroup files take them."""
    try:
        sections = sysconf.parse(text, path)
    except sysconf.SysconfError as e:
        raise LimitsError(str(e)) from None
    out: dict[str, dict[str, str]] = {}
    for section, entries in sections.items():
        values: dict[str, str] = {}
        for key, value in entries.items():
            if key not in LIMIT_FILES:
                raise LimitsError(
                    f"{path}: [{section}] {key}: unknown setting ({', '.join(LIMIT_FILES)})"
                )
            values[key] = _limit_value(key, value, f"{path}: [{section}]")
        out[section] = values
    return out


def limits_for(dtype: str, name: str, sysconfdir: str) -> dict[str, str]:
    """The admin's limits for a backend of descriptor ``name`` (its section over its type's)."""
    try:
        text, path = settings.read(sysconfdir, CONFIG)
    except sysconf.SysconfError as e:
        raise LimitsError(str(e)) from None
    if text is None:
        return {}
    config = parse_limits(text, path)
    merged: dict[str, str] = {}
    for section in sysconf.sections_for(dtype, name):
        merged.update(config.get(section, {}))
    return merged


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


class _NotOurs(Exception):
    pass


def _systemd_unit(path: str) -> bool:
    return os.path.basename(path).endswith((".service", ".scope", ".slice"))


def v2_mount(mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """Where the cgroup2 hierarchy is mounted (``/sys/fs/cgroup`` or, hybrid, ``.../unified``)."""
    text = _read(mountinfo) or ""
    found = None
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup2":
            parts = left.split()
            if len(parts) >= 5 and parts[3] == "/":  # the hierarchy's root, not a bind of a subtree
                found = parts[4].replace("\\040", " ")
                if found == "/sys/fs/cgroup":
                    return found
    return found


def own_cgroup(pid: int | str = "self") -> str | None:
    """The cgroup v2 path (``/a/b``) of a process, from the ``0::`` line of /proc/PID/cgroup."""
    for line in (_read(f"/proc/{pid}/cgroup") or "").splitlines():
        if line.startswith("0::"):
            return line[3:].split(" ", 1)[0] or "/"
    return None


@dataclass
class Usage:
    """What a cgroup consumed: -1 where the controller is not enabled."""

    cpu_usec: int = -1
    memory_current: int = -1
    memory_peak: int = -1
    tasks: int = -1

    def text(self) -> str:
        """systemd's "Consumed ..." wording."""
        parts = []
        if self.cpu_usec >= 0:
            parts.append(f"{format_usec(self.cpu_usec)} CPU time")
        if self.memory_peak >= 0:
            parts.append(f"{format_bytes(self.memory_peak)} memory peak")
        return ", ".join(parts) or "nothing measured"


def _int(text: str | None) -> int:
    try:
        return int((text or "").strip())
    except ValueError:
        return -1


@dataclass
class Cgroups:
    """The daemon's cgroup subtree; ``mode`` is "delegated", "nested" or "off" (``why``)."""

    mode: str = "off"
    why: str = ""
    mount: str = ""
    base: str = ""  # absolute directory of the subtree the backends' cgroups go in
    controllers: tuple[str, ...] = ()
    _warned: set[str] = field(default_factory=set)

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def describe(self) -> str:
        if not self.enabled:
            return f"off: {self.why}"
        rel = "/" + os.path.relpath(self.base, self.mount).lstrip(".")
        ctl = " ".join(self.controllers) or "none"
        return f"{self.mode}: {rel.rstrip('/') or '/'} (controllers: {ctl})"

    @classmethod
    def setup(
        cls, state_dir: str, *, mountinfo: str = "/proc/self/mountinfo", own: str | None = None
    ) -> Cgroups:
        """Find or make the subtree; never raises (``off`` with the reason instead)."""
        mount = v2_mount(mountinfo)
        if not mount:
            return cls(why="no cgroup v2 hierarchy is mounted")
        own = own if own is not None else own_cgroup()
        if own is None:
            return cls(
                why="this process is in no cgroup v2 (/proc/self/cgroup has no 0:: line)",
                mount=mount,
            )
        here = os.path.normpath(os.path.join(mount, own.lstrip("/")))
        try:
            mode, base = cls._arrange(here, mount, state_dir)
        except _NotOurs as e:
            return cls(why=str(e), mount=mount)
        except OSError as e:
            return cls(why=f"{here} is not writable ({e.strerror})", mount=mount)
        cg = cls(mode=mode, mount=mount, base=base)
        cg.controllers = cg._enable_controllers()
        return cg

    @staticmethod
    def _delegated(here: str) -> bool:
        """Is this cgroup ours to arrange? systemd marks a delegated unit's (Delegate=yes);
        outside systemd, one that nothing but this process runs in is taken as ours."""
        for attr in ("trusted.delegate", "user.delegate"):
            try:
                if os.getxattr(here, attr).strip() == b"1":
                    return True
            except OSError:
                pass
        if _systemd_unit(here):
            return False
        procs = (_read(os.path.join(here, "cgroup.procs")) or "").split()
        return procs == [str(os.getpid())]

    @classmethod
    def _arrange(cls, here: str, mount: str, state_dir: str) -> tuple[str, str]:
        if (
            here != mount
            and os.path.basename(here) == "daemon"
            and cls._delegated(os.path.dirname(here))
        ):
            return "delegated", os.path.dirname(
                here
            )  # already in our leaf (a re-exec, DelegateSubgroup=)
        if _systemd_unit(here) and not cls._delegated(here):
            # systemd's own cgroup, not delegated: writing below it is not ours to do.
            raise _NotOurs(f"{here} is systemd's and not delegated (the unit needs Delegate=yes)")
        if here != mount and cls._delegated(here):
            leaf = os.path.join(here, "daemon")
            os.makedirs(leaf, exist_ok=True)
            _write(os.path.join(leaf, "cgroup.procs"), "0")
            return "delegated", here
        tag = hashlib.sha256(os.path.realpath(state_dir).encode()).hexdigest()[:12]
        base = os.path.join(here, f"vhostuserd-{tag}")
        os.makedirs(base, exist_ok=True)
        if not os.access(os.path.join(base, "cgroup.procs"), os.W_OK):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))
        return "nested", base

    def _enable_controllers(self) -> tuple[str, ...]:
        offered = (_read(os.path.join(self.base, "cgroup.controllers")) or "").split()
        want = [c for c in CONTROLLERS if c in offered]
        if want:
            try:
                _write(
                    os.path.join(self.base, "cgroup.subtree_control"),
                    " ".join(f"+{c}" for c in want),
                )
            except OSError as e:
                log.warning(
                    "cgroup %s: cannot enable %s for the backends: %s",
                    self.base,
                    " ".join(want),
                    e.strerror,
                )
        enabled = (_read(os.path.join(self.base, "cgroup.subtree_control")) or "").split()
        return tuple(c for c in CONTROLLERS if c in enabled)

    def release(self) -> None:
        """At exit: the cgroups of backends that are gone go, and a nested subtree with no
        backend left (backends that still run stay, for the next daemon to re-adopt)."""
        if not self.enabled:
            return
        for path in self.leftovers():
            if not self.populated(path):
                self.remove(path)
        if self.mode == "nested":
            self.remove(self.base)

    # ---- one backend's cgroup

    def path_for(self, backend_id: str) -> str:
        return os.path.join(self.base, f"backend-{backend_id}")

    def create(self, backend_id: str, limits: dict[str, str] | None = None) -> str:
        """Make the backend's cgroup (empty if one is left over) and apply ``limits``."""
        path = self.path_for(backend_id)
        try:
            os.mkdir(path)
        except FileExistsError:
            self.kill(path)
        except FileNotFoundError:  # our nested subtree was removed under us (by an admin): again
            os.makedirs(path)
        for key, value in (limits or {}).items():
            name, controller = LIMIT_FILES[key]
            if controller not in self.controllers:
                if key not in self._warned:
                    self._warned.add(key)
                    log.warning(
                        "cgroup: the %s controller is not enabled here: %s=%s is not applied",
                        controller,
                        key,
                        value,
                    )
                continue
            try:
                _write(os.path.join(path, name), value)
            except OSError as e:
                log.warning("cgroup %s: cannot write %s=%s: %s", path, name, value, e.strerror)
        return path

    @staticmethod
    def launcher(path: str) -> tuple[str, ...]:
        """The command-line prefix that puts the process in ``path`` before running the rest."""
        return (LAUNCHER_SH, "-c", _LAUNCH, os.path.join(path, "cgroup.procs"))

    def kill(self, path: str) -> None:
        """SIGKILL every process of the cgroup, however it daemonized."""
        try:
            _write(os.path.join(path, "cgroup.kill"), "1")
            return
        except FileNotFoundError:
            if not os.path.isdir(path):
                return
        except OSError as e:
            log.warning("cgroup %s: cgroup.kill: %s", path, e.strerror)
        for pid in (_read(os.path.join(path, "cgroup.procs")) or "").split():  # Linux < 5.14
            try:
                os.kill(int(pid), 9)  # in the cgroup now: the kernel lists only live members
            except OSError:
                pass

    @staticmethod
    def populated(path: str) -> bool:
        for line in (_read(os.path.join(path, "cgroup.events")) or "").splitlines():
            if line.startswith("populated "):
                return line.split()[1] != "0"
        return False

    @staticmethod
    def members(path: str) -> list[int]:
        return [int(p) for p in (_read(os.path.join(path, "cgroup.procs")) or "").split()]

    @staticmethod
    def remove(path: str) -> bool:
        """rmdir the (empty) cgroup; False while processes are still leaving it."""
        try:
            os.rmdir(path)
        except FileNotFoundError:
            return True
        except OSError as e:
            if e.errno == errno.EBUSY:
                return False
            log.warning("cgroup %s: cannot remove it: %s", path, e.strerror)
        return True

    def usage(self, path: str) -> Usage:
        """cpu.stat (always there), and memory and tasks where those controllers are on."""
        u = Usage()
        for line in (_read(os.path.join(path, "cpu.stat")) or "").splitlines():
            if line.startswith("usage_usec "):
                u.cpu_usec = _int(line.split()[1])
                break
        if "memory" in self.controllers:
            u.memory_current = _int(_read(os.path.join(path, "memory.current")))
            u.memory_peak = _int(_read(os.path.join(path, "memory.peak")))  # Linux >= 5.19
        if "pids" in self.controllers:
            u.tasks = _int(_read(os.path.join(path, "pids.current")))
        return u

    def relative(self, path: str) -> str:
        """``path`` as the kernel names it (/proc/PID/cgroup), "" for none."""
        if not path or not self.mount:
            return ""
        return "/" + os.path.relpath(path, self.mount)

    def owns(self, path: str) -> bool:
        """Is ``path`` (absolute) one of our backends' cgroups?"""
        return os.path.dirname(path) == self.base and os.path.basename(path).startswith("backend-")

    def of_process(self, pid: int) -> str | None:
        """The absolute cgroup directory of ``pid`` if it is one of our backends' cgroups."""
        rel = own_cgroup(pid)
        if rel is None:
            return None
        path = os.path.normpath(os.path.join(self.mount, rel.lstrip("/")))
        return path if self.owns(path) else None

    def leftovers(self) -> list[str]:
        """Backend cgroups found in the subtree (for re-adoption and cleanup)."""
        try:
            names = os.listdir(self.base)
        except OSError:
            return []
        return sorted(
            os.path.join(self.base, n)
            for n in names
            if n.startswith("backend-") and os.path.isdir(os.path.join(self.base, n))
        )
