"""Real parts for the tests: a private dbus-daemon, the real vhostuserd as a subprocess,
and a descriptor tree on disk. Nothing here is a mock."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, TypeVar

from vhostuserd.core import lookup
from vhostuserd.edges import scan

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
VHOSTUSERD = str(VENV_BIN / "vhostuserd")
VHOSTUSERCTL = str(VENV_BIN / "vhostuserctl")
BUS_NAME = "org.vhostuserd.Broker1"
MANAGER_PATH = "/org/vhostuserd/Broker1"

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>{type}</type>
  <listen>unix:path={socket}</listen>
  <servicedir>{servicedir}</servicedir>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus"/>
  </policy>
  {extra}
</busconfig>
"""


POLL = 0.015
# How long `wait_for` and `await_for` wait by default: long enough for the slowest of them
# (polkit and setpriv callers) on a busy machine; a condition that holds returns at once.
WAIT = 20.0


def wait_for(cond: Callable[[], T], what: str | Callable[[], str], timeout: float = WAIT) -> T:
    """Poll ``cond`` until it returns something true; fail naming ``what`` (computed lazily,
    to show the state that did not match) after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            text = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout}s waiting for {text}")
        time.sleep(POLL)


async def await_for(
    cond: Callable[[], Any], what: str | Callable[[], str], timeout: float = WAIT
) -> Any:
    """Async `wait_for`; ``cond`` may return an awaitable."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            text = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout}s waiting for {text}")
        await asyncio.sleep(POLL)


def stop_process(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 5) -> int:
    """Signal ``proc`` if it still runs, wait, and SIGKILL it if it does not go in time."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def run(coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


class PrivateBus:
    """A real dbus-daemon on a socket in a temporary directory, with its own servicedir."""

    def __init__(
        self, kind: str = "session", extra_config: str = "", env: dict[str, str] | None = None
    ) -> None:
        if shutil.which("dbus-daemon") is None:
            raise RuntimeError("dbus-daemon is not installed (scripts/setup installs it)")
        self.dir = Path(tempfile.mkdtemp(prefix="vhostuserd-bus-"))
        self.socket = self.dir / "bus.sock"
        self.servicedir = self.dir / "services"
        self.servicedir.mkdir()
        self.config = self.dir / "bus.conf"
        self.config.write_text(
            BUS_CONFIG.format(
                type=kind, socket=self.socket, servicedir=self.servicedir, extra=extra_config
            )
        )
        self.address = f"unix:path={self.socket}"
        # Its complaints ("Rejected: destination has a full message queue", ...) go to a file: a
        # pipe nobody reads would fill, and dbus-daemon would block in write(2) for good.
        self.log_path = self.dir / "bus.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                ["dbus-daemon", f"--config-file={self.config}", "--nofork", "--print-address=1"],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=env,
            )
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.startswith("unix:"):
            raise RuntimeError(f"dbus-daemon did not start: {self.log_path.read_text()}")

    def reload(self) -> None:
        """Re-read the config and servicedir (synchronous, unlike SIGHUP)."""
        self.busctl(
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "ReloadConfig",
        )

    def close(self) -> None:
        stop_process(self.proc)
        for f in (self.proc.stdout, self.proc.stderr):
            if f:
                f.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def busctl(
        self, *args: str, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["busctl", f"--address={self.address}", *args],
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )

    def name_has_owner(self, name: str = BUS_NAME) -> bool:
        r = self.busctl(
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "NameHasOwner",
            "s",
            name,
        )
        return r.stdout.strip() == "b true"


SUBDIR = Path("qemu/vhost-user")

Content = bytes | str | Mapping[str, Any]


def _as_bytes(content: Content) -> bytes:
    if isinstance(content, bytes):
        return content
    if isinstance(content, str):
        return content.encode("utf-8")
    return json.dumps(content).encode("utf-8")


@dataclass
class Tree:
    """A descriptor search path on disk under ``root``: ``data`` (one directory per
    XDG_DATA_DIRS entry, most important first), ``sysconfdir``, and the user tier under
    ``config_home`` ($HOME/.config). A tier's ``qemu/vhost-user`` directory is made when
    `dir` (or `write`, `symlink`) first names it; `make` makes them all at once.

    `env` is the environment of a vhostuserd or vhostuserctl that sees only this tree;
    `search_path`, `listings` and `lookup` run the real scan and the pure merge over it."""

    root: Path
    data_count: int = 1
    data: list[Path] = field(init=False)
    sysconfdir: Path = field(init=False)
    home: Path = field(init=False)
    config_home: Path = field(init=False)

    def __post_init__(self) -> None:
        self.data = [self.root / f"data{i}" for i in range(self.data_count)]
        self.sysconfdir = self.root / "etc"
        self.home = self.root / "home"
        self.config_home = self.home / ".config"
        for d in [*self.data, self.sysconfdir, self.config_home]:
            d.mkdir(parents=True, exist_ok=True)
        (self.root / "run").mkdir(mode=0o700, exist_ok=True)  # $XDG_RUNTIME_DIR

    @classmethod
    def make(cls, root: Path, data_count: int = 2) -> Self:
        """The daemon tests' tree: two data directories, and every tier's directory there
        before the daemon starts watching."""
        t = cls(root, data_count)
        for i in range(data_count):
            t.dir("data", i)
        t.dir("sysconf")
        t.dir("user")
        return t

    def dir(self, tier: str, index: int = 0) -> Path:
        """The ``qemu/vhost-user`` directory of ``tier`` ("data": the ``index``-th;
        "sysconf"; "user"), made if it is missing."""
        base = {
            "data": self.data[index] if tier == "data" else None,
            "sysconf": self.sysconfdir,
            "user": self.config_home,
        }[tier]
        assert base is not None, tier
        path = base / SUBDIR
        path.mkdir(parents=True, exist_ok=True)
        return path

    def write(
        self, tier: str, name: str, content: Content, index: int = 0, atomic: bool = False
    ) -> Path:
        """Write ``content`` (a document is written as JSON) as ``name`` in ``tier``;
        ``atomic``: through a temporary dot-file renamed over it."""
        path = self.dir(tier, index) / name
        if atomic:
            tmp = path.parent / f".{name}.tmp"
            tmp.write_bytes(_as_bytes(content))
            os.rename(tmp, path)
        else:
            path.write_bytes(_as_bytes(content))
        return path

    def symlink(self, tier: str, name: str, target: str | Path, index: int = 0) -> Path:
        path = self.dir(tier, index) / name
        path.symlink_to(target)
        return path

    @property
    def xdg_data_dirs(self) -> str:
        return ":".join(str(d) for d in self.data)

    def env(self, **extra: str) -> dict[str, str]:
        """This process's environment without its XDG_* and DBUS_* variables, with this
        tree's data dirs, user tier, home and runtime directory (and ``extra``)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "DBUS_"))}
        env.update(
            LC_ALL="C.UTF-8",
            HOME=str(self.home),
            XDG_CONFIG_HOME=str(self.config_home),
            XDG_DATA_DIRS=self.xdg_data_dirs,
            XDG_RUNTIME_DIR=str(self.root / "run"),
        )
        env.update(extra)
        return env

    def search_path(self, *, system: bool = False) -> tuple[lookup.Directory, ...]:
        """The search path a daemon or vhostuserctl started with `env` uses."""
        env = self.env()
        return lookup.search_path(
            system=system,
            sysconfdir=str(self.sysconfdir),
            xdg_data_dirs=env["XDG_DATA_DIRS"],
            xdg_config_home=env["XDG_CONFIG_HOME"],
            home=env["HOME"],
        )

    def listings(self, *, system: bool = False) -> list[lookup.Listing]:
        return scan.list_all(self.search_path(system=system))

    def lookup(self, *, system: bool = False) -> lookup.LookupResult:
        """The reference: the pure merge of a fresh scan of the directories."""
        return lookup.merge(self.listings(system=system))


class RealTree(Tree):
    """A test tree with /usr/share last in XDG_DATA_DIRS: the machine's Debian descriptors
    (50-qemu-gpu.json, 50-qemu-virtiofsd.json) come after the test's own."""

    def env(self, **extra: str) -> dict[str, str]:
        env = super().env()
        env["XDG_DATA_DIRS"] += ":/usr/share"
        env.update(extra)
        return env


def descriptor(
    btype: str = "gpu", binary: str = "/usr/bin/true", description: str = "test"
) -> dict[str, Any]:
    return {"description": description, "type": btype, "binary": binary}


def fake_backend(path: Path, btype: str, features: list[str], body: str = "") -> str:
    """An executable that answers --print-capabilities like a real backend."""
    caps = json.dumps({"type": btype, "features": features})
    path.write_text(
        "#!/bin/sh\n"
        f"if [ \"$1\" = --print-capabilities ]; then echo '{caps}'; exit 0; fi\n"
        f"{body or 'exec sleep 3600'}\n"
    )
    path.chmod(0o755)
    return str(path)


class Daemon:
    """The real vhostuserd, started as a subprocess on a private bus."""

    def __init__(
        self,
        bus: PrivateBus,
        tree: Tree,
        *args: str,
        wait: bool = True,
        wrapper: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> None:
        """``wrapper``: a command that ends by exec'ing the daemon's command line, which
        follows it (a launcher, ``unshare``, ``strace``); ``env``: more variables than the
        tree's; ``wait``: return once it is `ready`."""
        self.bus = bus
        self.tree = tree
        self.log_path = tree.root / f"vhostuserd-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - the daemon's stdout until stop()
        self.proc = subprocess.Popen(
            [
                *wrapper,
                VHOSTUSERD,
                "--address",
                bus.address,
                "--sysconfdir",
                str(tree.sysconfdir),
                "--log-level",
                "debug",
                *args,
            ],
            env=tree.env(**(env or {})),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            pass_fds=pass_fds,
        )
        if wait:
            self.ready()

    def ready(self, timeout: float = 20) -> None:
        """`wait_ready`, or SIGKILL: never leave a half-started daemon behind."""
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop(signal.SIGKILL)
            raise

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vhostuserd exited with {self.proc.returncode}:\n{self.log()}")
            # Owning the name, and watching the directories (the watcher arms just after).
            if self.bus.name_has_owner() and "watching " in self.log():
                return
            time.sleep(0.02)
        raise RuntimeError(f"vhostuserd did not take its name in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        code = stop_process(self.proc, sig, timeout)
        self._log.close()
        return code

    def assert_clean_log(self) -> None:
        text = self.log()
        assert "Traceback" not in text, text
        assert "exception" not in text.lower(), text


def ctl(
    bus: PrivateBus | None, tree: Tree, *args: str, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    cmd = [VHOSTUSERCTL] + (["--address", bus.address] if bus else []) + list(args)
    return subprocess.run(
        cmd, env=tree.env(), capture_output=True, text=True, timeout=timeout, check=False
    )
