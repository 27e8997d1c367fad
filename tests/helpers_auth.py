"""Helpers for the authorization tests: the system-mode daemon on a private system bus,
unprivileged callers as real processes of another uid, polkit authorities (the
python-dbusmock polkitd template, a recording mock of our own, the real polkitd), fake
backends the system service will run (what runs is read from /proc by helpers_spawn).

A `Caller` is a small dbus-fast client in its own process (tests/agents/caller.py), started
through `setpriv --reuid=UID` when UID is not 0; the test drives it over its stdin/stdout
with one JSON object per line, so everything the daemon learns about the caller (uid, pid,
unique name) comes from the bus, as it would for a real client.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import pwd
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import busutil
from busutil import MANAGER_PATH, Daemon, PrivateBus, Tree, fake_backend, wait_for
from helpers_spawn import kill_marked, pids_with, status

NOBODY = 65534


def _other_user() -> tuple[int, int]:
    """A second unprivileged account (uid, primary gid), from base-passwd's fixed entries.
    dbus-daemon refuses connections from a uid with no passwd entry, so it must exist."""
    for name in ("games", "man", "news", "uucp", "list", "irc", "proxy"):
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            continue
        if pw.pw_uid not in (0, NOBODY):
            return pw.pw_uid, pw.pw_gid
    raise RuntimeError("no second unprivileged account in /etc/passwd")


OTHER_UID, OTHER_GID = _other_user()
MANAGER_IFACE = "org.vhostuserd.Broker1.Manager"
BACKEND_IFACE = "org.vhostuserd.Broker1.Backend"
PROPS_IFACE = "org.freedesktop.DBus.Properties"
ERROR = "org.vhostuserd.Broker1.Error."
SPAWN = "org.vhostuserd.spawn"
SPAWN_DEVICE = "org.vhostuserd.spawn-device"
MANAGE = "org.vhostuserd.manage"
POLKIT_NAME = "org.freedesktop.PolicyKit1"
POLKIT_PATH = "/org/freedesktop/PolicyKit1/Authority"
DEBIAN_PYTHON = "/usr/bin/python3"
AGENTS = Path(__file__).resolve().parent / "agents"
TIMEOUT = 20.0


def public_dir(prefix: str) -> Path:
    """A root-owned 0755 directory right under /tmp: every uid can read and run what is in it,
    and the trusted-binary check accepts it (/tmp is a sticky root directory)."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    d.chmod(0o755)
    return d


def agent(name: str, directory: Path) -> Path:
    """tests/agents/NAME copied into ``directory`` (a `public_dir`) with mode 0644: there any
    uid can run it, wherever the clone is (a directory above it may be closed to uid 65534)."""
    path = directory / name
    shutil.copyfile(AGENTS / name, path)
    path.chmod(0o644)
    return path


def nobody_workdir(prefix: str) -> Iterator[Path]:
    """For fixtures: a public directory whose run/ uid 65534 may write (its sockets, QEMU's
    files); removed afterwards."""
    d = public_dir(prefix)
    (d / "run").mkdir()
    os.chown(d / "run", NOBODY, NOBODY)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def as_nobody(*argv: str) -> list[str]:
    """``argv`` run as uid 65534 with no supplementary groups."""
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]


def system_bus(extra_config: str = "") -> PrivateBus:
    """A private dbus-daemon of type system that every uid may connect to."""
    bus = PrivateBus(kind="system", extra_config=extra_config)
    bus.dir.chmod(0o755)
    return bus


def backend(directory: Path, name: str, btype: str, features: Sequence[str] = ()) -> str:
    """A root-owned fake backend that answers --print-capabilities and then keeps running as
    /bin/sh with its own argv (so /proc/PID/cmdline shows what it was given)."""
    return fake_backend(directory / name, btype, list(features), "while :; do sleep 1; done")


def descriptor_doc(btype: str, binary: str) -> dict[str, Any]:
    return {"description": f"test {btype}", "type": btype, "binary": binary}


def system_args(tree: Tree) -> tuple[str, ...]:
    """vhostuserd's arguments for the system service (system tiers and polkit), with its state
    directory in ``tree``."""
    return ("--system", "--state-dir", str(tree.root / "state"))


def system_daemon(bus: PrivateBus, tree: Tree, *args: str) -> Daemon:
    """The real vhostuserd with system tiers and polkit, on the private bus."""
    return Daemon(bus, tree, *system_args(tree), *args)


# ------------------------------------------------------------------ callers


_agent_path: Path | None = None


def agent_path() -> Path:
    """tests/agents/caller.py, in a directory every uid can read (one per test process)."""
    global _agent_path
    if _agent_path is None or not _agent_path.exists():
        d = public_dir("vhostuserd-agent-")
        atexit.register(shutil.rmtree, d, True)
        _agent_path = agent("caller.py", d)
    return _agent_path


@dataclass
class Reply:
    body: list[Any] = field(default_factory=list)
    error: str | None = None
    message: str = ""
    local_error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.local_error is None

    def __str__(self) -> str:
        if self.local_error:
            return f"<local error {self.local_error}>"
        if self.error:
            return f"<{self.error}: {self.message}>"
        return f"<ok {self.body!r}>"

    def expect_error(self, short: str) -> str:
        """Assert the reply is org.vhostuserd.Broker1.Error.<short> (or a full name); return
        the message."""
        name = short if "." in short else ERROR + short
        assert self.error == name, f"expected {name}, got {self}"
        return self.message


_ids = itertools.count(1)


class Caller:
    """A D-Bus client process running as ``uid`` (see the module docstring)."""

    def __init__(
        self,
        address: str,
        uid: int = NOBODY,
        gid: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        script = agent_path()
        cmd = [sys.executable, str(script), address]
        if uid != 0:
            if gid is None:
                gid = pwd.getpwuid(uid).pw_gid if uid in (NOBODY, OTHER_UID) else uid
            cmd = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *cmd]
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed with the child
        base = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": "/nonexistent",
            "LANG": "C.UTF-8",
        }
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            cwd=str(script.parent),
            env={**base, **(env or {})},
        )
        self._q: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._results: dict[int, dict[str, Any]] = {}
        threading.Thread(target=self._read, daemon=True).start()
        hello = self._next(TIMEOUT)
        if hello is None or "hello" not in hello:
            raise RuntimeError(f"caller did not start: {hello} {self.err()}")
        self.name: str = hello["hello"]
        self.uid: int = hello["uid"]
        self.pid: int = hello["pid"]
        assert self.uid == uid, (self.uid, uid)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._q.put(json.loads(line))
        self._q.put(None)

    def _next(self, timeout: float) -> dict[str, Any] | None:
        try:
            return self._q.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"caller (uid) gave no answer in {timeout}s; stderr: {self.err()}"
            ) from None

    def err(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")

    def _send(self, obj: dict[str, Any]) -> int:
        obj["id"] = n = next(_ids)
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()
        return n

    def send(self, member: str, signature: str = "", body: Sequence[Any] = (), **kw: Any) -> int:
        """Send a call; its reply is collected by `result`."""
        return self._send(
            {"op": "call", "member": member, "signature": signature, "body": list(body), **kw}
        )

    def result(self, n: int, timeout: float = TIMEOUT) -> Reply:
        deadline = time.monotonic() + timeout
        while n not in self._results:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no reply to call {n} in {timeout}s; stderr: {self.err()}")
            item = self._next(left)
            if item is None:
                raise AssertionError(f"caller exited before replying; stderr: {self.err()}")
            self._results[item["id"]] = item
        r = self._results.pop(n)
        return Reply(
            body=r.get("body", []),
            error=r.get("error"),
            message=r.get("message", ""),
            local_error=r.get("local_error"),
        )

    def call(
        self,
        member: str,
        signature: str = "",
        body: Sequence[Any] = (),
        timeout: float = TIMEOUT,
        **kw: Any,
    ) -> Reply:
        return self.result(self.send(member, signature, body, **kw), timeout)

    def fake_root(self, directory: Path) -> Reply:
        return self.result(self._send({"op": "fake_root", "dir": str(directory)}))

    # -- the broker's API

    def spawn(
        self,
        name: str,
        options: dict[str, tuple[str, Any]] | None = None,
        fd: str = "socketpair",
        timeout: float = TIMEOUT,
        **kw: Any,
    ) -> Reply:
        return self.result(self.send_spawn(name, options, fd, **kw), timeout)

    def send_spawn(
        self,
        name: str,
        options: dict[str, tuple[str, Any]] | None = None,
        fd: str = "socketpair",
        **kw: Any,
    ) -> int:
        opts = {k: {"$v": list(sv)} for k, sv in (options or {}).items()}
        return self.send("Spawn", "sa{sv}h", [name, opts, {"$fd": fd}], **kw)

    def backends(self) -> list[dict[str, Any]]:
        r = self.call("ListBackends")
        assert r.ok, str(r)
        return r.body[0]

    def descriptors(self) -> list[dict[str, Any]]:
        r = self.call("ListDescriptors", "s", [""])
        assert r.ok, str(r)
        return r.body[0]

    def prop(self, name: str, path: str = MANAGER_PATH, interface: str = MANAGER_IFACE) -> Any:
        r = self.call("Get", "ss", [interface, name], path=path, interface=PROPS_IFACE)
        assert r.ok, str(r)
        return r.body[0]

    def stop_backend(self, path: str) -> Reply:
        return self.call("Stop", path=path, interface=BACKEND_IFACE)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()
        self._close_pipes()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close_pipes()

    def _close_pipes(self) -> None:
        # stdout belongs to the reader thread, which sees EOF now that the process is gone.
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
        except OSError:
            pass
        self.stderr.close()


class Callers:
    """Callers started by one test; all closed at its end."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.started: list[Caller] = []

    def __call__(self, uid: int = NOBODY, **kw: Any) -> Caller:
        c = Caller(self.address, uid, **kw)
        self.started.append(c)
        return c

    def close(self) -> None:
        for c in self.started:
            c.kill()


# ------------------------------------------------------------------ polkit authorities


def busctl_json(bus: PrivateBus, *args: str) -> Any:
    r = bus.busctl("--json=short", *args)
    return json.loads(r.stdout) if r.stdout.strip() else None


class DbusmockPolkit:
    """python-dbusmock's polkitd template, run by Debian's python3 as a separate process."""

    def __init__(self, bus: PrivateBus) -> None:
        if (
            not os.access(DEBIAN_PYTHON, os.X_OK)
            or subprocess.run(
                [DEBIAN_PYTHON, "-c", "import dbusmock"], capture_output=True, check=False
            ).returncode
            != 0
        ):
            raise RuntimeError(
                "python3-dbusmock is not installed for /usr/bin/python3 (scripts/setup installs it)"
            )
        self.bus = bus
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("DBUS_", "PYTHON", "VIRTUAL_ENV"))
        }
        env["DBUS_SYSTEM_BUS_ADDRESS"] = bus.address
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - the mock's output, until close()
        self.proc = subprocess.Popen(
            [DEBIAN_PYTHON, "-m", "dbusmock", "--system", "--template", "polkitd"],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_for(
            lambda: self.proc.poll() is not None or bus.name_has_owner(POLKIT_NAME),
            "the polkitd mock to take its name",
        )
        if self.proc.poll() is not None:
            self.log.seek(0)
            raise RuntimeError(
                f"the polkitd mock exited: {self.log.read().decode(errors='replace')}"
            )

    def _mock(self, member: str, signature: str = "", *args: str) -> Any:
        return busctl_json(
            self.bus,
            "call",
            POLKIT_NAME,
            POLKIT_PATH,
            "org.freedesktop.DBus.Mock",
            member,
            *([signature, *args] if signature else []),
        )

    def set_allowed(self, *actions: str) -> None:
        self._mock("SetAllowed", "as", str(len(actions)), *actions)

    def simulate_hang(self, hang: bool) -> None:
        self._mock("SimulateHang", "b", "true" if hang else "false")

    def release(self) -> None:
        self._mock("ReleaseHangingCalls")

    def hanging(self) -> bool:
        return bool(self._mock("HaveHangingCalls")["data"][0])

    def clear_calls(self) -> None:
        self._mock("ClearCalls")

    def checks(self) -> list[tuple[str, dict[str, str], int]]:
        """(action id, details, flags) of every CheckAuthorization so far."""
        data = self._mock("GetMethodCalls", "s", "CheckAuthorization")["data"][0]
        out = []
        for _ts, args in data:
            values = [a["data"] for a in args]
            out.append((values[1], values[2], values[3]))
        return out

    def actions(self) -> list[str]:
        return [a for a, _, _ in self.checks()]

    def reset(self) -> None:
        self.simulate_hang(False)
        self.release()
        self.set_allowed()
        self.clear_calls()

    def close(self) -> None:
        busutil.stop_process(self.proc)
        self.log.close()


class RecordingPolkit:
    """Our own polkit authority (tests/agents/recording_polkit.py): answers from a table the
    test sets and records every CheckAuthorization call as it arrived (subject, action,
    details, flags)."""

    def __init__(self, bus: PrivateBus, directory: Path) -> None:
        self.record = directory / "polkit-calls.jsonl"
        self.answers = directory / "polkit-answers.json"
        self.record.write_text("")
        self.answer({})
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(AGENTS / "recording_polkit.py"),
                bus.address,
                str(self.record),
                str(self.answers),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"recording polkit did not start: {line}{err}")

    def answer(self, table: dict[str, Any]) -> None:
        """{action or "*": [authorized, challenge] or "error"}; unlisted actions are denied."""
        tmp = self.answers.with_suffix(".tmp")
        tmp.write_text(json.dumps(table))
        os.replace(tmp, self.answers)

    def calls(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.record.read_text().splitlines()]

    def clear(self) -> None:
        self.record.write_text("")

    def close(self) -> None:
        busutil.stop_process(self.proc)
        for f in (self.proc.stdout, self.proc.stderr):
            if f:
                f.close()


# ------------------------------------------------------------------ a standard setup


@dataclass
class SystemSetup:
    """A system-mode daemon with a gpu, an fs (-o form) and an fs (separate options)
    descriptor whose fake backends live in ``bin``; ``marker`` is in every backend's argv."""

    bus: PrivateBus
    tree: Tree
    bin: Path
    daemon: Daemon
    callers: Callers
    marker: str
    _admin: Caller | None = None

    def running(self) -> list[int]:
        return pids_with(self.marker)

    def admin(self) -> Caller:
        """A root caller (one per setup)."""
        if self._admin is None:
            self._admin = self.callers(0)
        return self._admin


def standard_tree(tree: Tree, bindir: Path) -> None:
    gpu = backend(bindir, "vhost-user-gpu", "gpu", ["render-node", "virgl"])
    fs = backend(bindir, "virtiofsd-o", "fs", [])
    fs2 = backend(bindir, "virtiofsd", "fs", ["separate-options"])
    inp = backend(bindir, "vhost-user-input", "input", ["evdev-path", "no-grab"])
    tree.write("data", "50-gpu.json", descriptor_doc("gpu", gpu))
    tree.write("data", "50-fs-o.json", descriptor_doc("fs", fs))
    tree.write("data", "50-fs.json", descriptor_doc("fs", fs2))
    tree.write("sysconf", "50-input.json", descriptor_doc("input", inp))


def setup(
    bus: PrivateBus,
    tree: Tree,
    *daemon_args: str,
    prepare: Callable[[Tree, Path], None] | None = None,
) -> Iterator[SystemSetup]:
    """A generator for fixtures: yields a `SystemSetup`, then stops everything it started."""
    bindir = public_dir("vhostuserd-bin-")
    callers = Callers(bus.address)
    daemon = None
    try:
        standard_tree(tree, bindir)
        if prepare is not None:
            prepare(tree, bindir)
        daemon = system_daemon(bus, tree, *daemon_args)
        yield SystemSetup(bus, tree, bindir, daemon, callers, bindir.name)
    finally:
        callers.close()
        if daemon is not None:
            daemon.stop()
        kill_marked(argv=bindir.name)
        shutil.rmtree(bindir, ignore_errors=True)


Start = Callable[..., SystemSetup]


def starts(
    bus: PrivateBus,
    polkit: DbusmockPolkit,
    root: Path,
    prepare: Callable[[Tree, Path], None] | None = None,
) -> Iterator[Start]:
    """For a ``start`` fixture, with polkit allowing spawn only: yields
    start(*daemon_args, prepare=PREPARE), a `setup` on a `Tree.make(root)` that returns its
    `SystemSetup`; afterwards polkit is reset and every setup stopped."""
    polkit.reset()
    polkit.set_allowed(SPAWN)
    gens: list[Iterator[SystemSetup]] = []

    def start(*args: str, prepare: Callable[[Tree, Path], None] | None = prepare) -> SystemSetup:
        g = setup(bus, Tree.make(root), *args, prepare=prepare)
        gens.append(g)
        return next(g)

    yield start
    polkit.reset()
    for g in gens:
        next(g, None)


def backend_pid(admin: Caller, path: str) -> int:
    return int(admin.prop("Pid", path, BACKEND_IFACE))


def wait_gone(pid: int, timeout: float = TIMEOUT) -> None:
    def gone() -> bool:
        try:
            return status(pid).get("State", "").startswith("Z")
        except OSError:
            return True

    wait_for(gone, f"pid {pid} to exit", timeout)
