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
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

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


def wait_for(cond: Callable[[], T], what: str | Callable[[], str], timeout: float = 10.0) -> T:
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
    cond: Callable[[], Any], what: str | Callable[[], str], timeout: float = 10.0
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


@dataclass
class Tree:
    """A descriptor search path on disk: data dirs (most important first), sysconf, user."""

    root: Path
    data: list[Path] = field(default_factory=list)
    sysconfdir: Path = Path()
    config_home: Path = Path()

    @classmethod
    def make(cls, root: Path, n_data: int = 2) -> Tree:
        t = cls(root)
        t.data = [root / f"share{i}" for i in range(n_data)]
        t.sysconfdir = root / "etc"
        t.config_home = root / "config"
        for d in t.data:
            (d / "qemu/vhost-user").mkdir(parents=True)
        (t.sysconfdir / "qemu/vhost-user").mkdir(parents=True)
        (t.config_home / "qemu/vhost-user").mkdir(parents=True)
        (root / "home").mkdir()
        (root / "run").mkdir(mode=0o700)
        return t

    def dir(self, tier: str, i: int = 0) -> Path:
        if tier == "data":
            return self.data[i] / "qemu/vhost-user"
        if tier == "sysconf":
            return self.sysconfdir / "qemu/vhost-user"
        return self.config_home / "qemu/vhost-user"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "DBUS_"))}
        env.update(
            XDG_DATA_DIRS=":".join(str(d) for d in self.data),
            XDG_CONFIG_HOME=str(self.config_home),
            HOME=str(self.root / "home"),
            XDG_RUNTIME_DIR=str(self.root / "run"),
        )
        return env

    def write(
        self,
        tier: str,
        name: str,
        doc: dict[str, Any] | str | bytes,
        i: int = 0,
        atomic: bool = False,
    ) -> Path:
        path = self.dir(tier, i) / name
        data = (
            doc
            if isinstance(doc, bytes)
            else (doc if isinstance(doc, str) else json.dumps(doc)).encode()
        )
        if atomic:
            tmp = path.parent / f".{name}.tmp"
            tmp.write_bytes(data)
            os.rename(tmp, path)
        else:
            path.write_bytes(data)
        return path


class RealTree(Tree):
    """A test tree with /usr/share last in XDG_DATA_DIRS: the machine's Debian descriptors
    (50-qemu-gpu.json, 50-qemu-virtiofsd.json) come after the test's own."""

    def env(self) -> dict[str, str]:
        env = super().env()
        env["XDG_DATA_DIRS"] += ":/usr/share"
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

    def __init__(self, bus: PrivateBus, tree: Tree, *args: str, wait: bool = True) -> None:
        self.bus = bus
        self.tree = tree
        self.log_path = tree.root / f"vhostuserd-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - the daemon's stdout until stop()
        self.proc = subprocess.Popen(
            [
                VHOSTUSERD,
                "--address",
                bus.address,
                "--sysconfdir",
                str(tree.sysconfdir),
                "--log-level",
                "debug",
                *args,
            ],
            env=tree.env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        if wait:
            try:
                self.wait_ready()
            except BaseException:
                self.stop(signal.SIGKILL)  # never leave a half-started daemon behind
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
