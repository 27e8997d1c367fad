"""Helpers for the spawning tests: fake backends installed into a test's tree, a client
connection that records the broker's signals, and what /proc says about processes.

Fake backends (tests/fake_backends/) are installed as copies in TREE/bin, each with the
interpreter line pointing at this interpreter, `fakelib.py` next to it and its
configuration in ``<binary>.conf.json``. Every installed binary's name starts with the
tree's *marker* (a short token derived from the tree's path), and so does the kernel's
``comm`` of every process it becomes, zombies and forked helpers included: `marked`
finds whatever a test left behind, without trusting pids alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from busutil import BUS_NAME, MANAGER_PATH, Daemon, Tree, descriptor, wait_for
from dbus_fast import Message, MessageType, Variant

from vhostuserd.client import BrokerClient
from vhostuserd.core.names import MANAGER_IFACE

FAKES = Path(__file__).resolve().parent / "fake_backends"
ERROR = "org.vhostuserd.Broker1.Error."
TIMEOUT = 10.0

OM_IFACE = "org.freedesktop.DBus.ObjectManager"


# ---------------------------------------------------------------- fake backends


def marker(tree: Tree) -> str:
    """Six characters unique to this tree, the start of every fake backend's comm."""
    return "v" + hashlib.sha1(str(tree.root).encode()).hexdigest()[:5]


@dataclass
class Fake:
    """An installed fake backend and the descriptor naming it."""

    path: Path
    name: str  # the descriptor's name
    report_dir: Path
    btype: str

    def report(self, pid: int, timeout: float = TIMEOUT) -> dict[str, Any]:
        """What the backend with ``pid`` reported about itself (waits for it)."""
        path = self.report_dir / f"{pid}.json"
        wait_for(path.exists, f"the report of {self.path.name} pid {pid}", timeout)
        data: dict[str, Any] = json.loads(path.read_text())
        return data

    def reports(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted(self.report_dir.glob("*.json"))]


def install(
    tree: Tree,
    kind: str,
    btype: str = "gpu",
    features: Sequence[str] | None = (),
    *,
    short: str | None = None,
    priority: int = 50,
    write_descriptor: bool = True,
    **config: Any,
) -> Fake:
    """Install tests/fake_backends/KIND.py (or .sh) for ``tree`` with a descriptor
    ``PRIORITY-SHORT.json`` in the first data directory. ``features`` None: the probe
    prints no features list at all."""
    short = short or kind.split("_")[0]
    bindir = tree.root / "bin"
    bindir.mkdir(exist_ok=True)
    binary = bindir / f"{marker(tree)}-{short}"
    assert not binary.exists(), f"{binary} installed twice; give another short name"
    report_dir = tree.root / "reports" / short
    report_dir.mkdir(parents=True)
    caps = {"type": btype, **({"features": list(features)} if features is not None else {})}
    src = FAKES / f"{kind}.py"
    if src.exists():
        shutil.copy(FAKES / "fakelib.py", bindir / "fakelib.py")
        body = src.read_text().split("\n", 1)[1]
        # -S: no site-packages; the fakes need only the standard library, and start faster.
        binary.write_text(f"#!{sys.executable} -S\n{body}")
        conf = {**caps, "report_dir": str(report_dir), **config}
        Path(f"{binary}.conf.json").write_text(json.dumps(conf))
    else:
        text = (FAKES / f"{kind}.sh").read_text()
        binary.write_text(text.replace("@CAPS@", json.dumps(caps)))
    binary.chmod(0o755)
    name = f"{priority}-{short}.json"
    if write_descriptor:
        tree.write("data", name, descriptor(btype, str(binary)))
    return Fake(binary, name, report_dir, btype)


# ---------------------------------------------------------------- processes


def proc_stat(pid: int) -> tuple[str, str, int, int, int] | None:
    """(comm, state, ppid, pgid, starttime) of ``pid``, None when there is no such process
    (a zombie is still a process)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    comm = raw[raw.index(b"(") + 1 : raw.rindex(b")")].decode("utf-8", "replace")
    fields = raw.rsplit(b")", 1)[1].split()
    return comm, fields[0].decode(), int(fields[1]), int(fields[2]), int(fields[19])


def gone(pid: int, start_time: int | None = None) -> bool:
    """No process (alive or zombie) with this pid, or a different one (pid reused)."""
    st = proc_stat(pid)
    return st is None or (start_time is not None and st[4] != start_time)


def alive(pid: int) -> bool:
    st = proc_stat(pid)
    return st is not None and st[1] not in ("Z", "X")


def marked(tree: Tree) -> list[tuple[int, str, str, int]]:
    """Every process (zombies included) that a fake backend of ``tree`` became:
    (pid, comm, state, ppid)."""
    prefix = marker(tree)
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = proc_stat(int(entry))
            if st is not None and st[0].startswith(prefix):
                out.append((int(entry), st[0], st[1], st[2]))
    return sorted(out)


def wait_none_marked(tree: Tree, timeout: float = TIMEOUT) -> None:
    wait_for(
        lambda: not marked(tree),
        lambda: f"no process of this test's fakes left; have {marked(tree)}",
        timeout,
    )


def cmdline(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return [a.decode("utf-8", "surrogateescape") for a in raw.split(b"\0")[:-1]]


def status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def ids(status_line: str) -> list[int]:
    return [int(x) for x in status_line.split()]


def pids_with(marker: str) -> list[int]:
    """Live (not zombie) processes with ``marker`` in their command line."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        argv = cmdline(int(entry))
        if not argv or not any(marker in a for a in argv):
            continue
        try:
            if status(int(entry)).get("State", "").startswith("Z"):
                continue
        except OSError:
            continue
        out.append(int(entry))
    return out


def kill_marked(tree: Tree | None = None, *, argv: str | None = None) -> None:
    """Clean up after a test (a failed one above all): SIGKILL, with its process group,
    whatever it left behind. With ``tree``: the fakes installed for it, by their marker, and
    any other backend (a `sleep` a wrapper became, a real one) by the daemon's records in
    the tree's state directory, when the pid still runs what was recorded. With ``argv``:
    every live process that has it in its command line (the name of the directory its
    binary or its files are in)."""
    pids: set[int] = set()
    if tree is not None:
        pids.update(pid for pid, _comm, _state, _ppid in marked(tree))
        state = tree.root / "run" / "vhostuserd"
        for record in state.glob("backend-*.json") if state.is_dir() else ():
            try:
                rec = json.loads(record.read_text())
                st = proc_stat(int(rec["pid"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if st is not None and int(rec.get("start_time", 0)) in (0, st[4]):
                pids.add(int(rec["pid"]))
    if argv is not None:
        pids.update(pids_with(argv))
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def fds_of(pid: int) -> dict[int, str]:
    d = f"/proc/{pid}/fd"
    out = {}
    for name in os.listdir(d):
        try:
            out[int(name)] = os.readlink(f"{d}/{name}")
        except OSError:
            pass
    return out


def environ_of(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        raw = f.read()
    return dict(item.decode().split("=", 1) for item in raw.split(b"\0") if item)


def signal_masks(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("SigBlk", "SigIgn", "SigCgt", "SigPnd", "ShdPnd"):
                out[key] = int(value.strip(), 16)
    return out


def settle_fd_count(daemon: Daemon, baseline: int, timeout: float = 5.0) -> None:
    """Wait until the daemon's open-fd count is back at ``baseline``."""
    last = [daemon.fd_count()]

    def back() -> bool:
        last[0] = daemon.fd_count()
        return last[0] == baseline

    wait_for(
        back,
        lambda: (
            f"the daemon's fd count to return to {baseline}; it is {last[0]}: "
            f"{fds_of(daemon.proc.pid)}"
        ),
        timeout,
    )


# ---------------------------------------------------------------- sockets


def connected_pair() -> tuple[socket.socket, socket.socket]:
    """(ours, theirs): theirs is passed to a gpu/input backend."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


def listening(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(1)
    return s


def socket_for(fake: Fake, tmp: Path) -> socket.socket:
    """The right kind of socket for ``fake``: the theirs end of a pair, or a listener."""
    if fake.btype in ("gpu", "input"):
        ours, theirs = connected_pair()
        ours.close()
        return theirs
    return listening(tmp / f"{fake.path.name}-{time.monotonic_ns()}.sock")


# ---------------------------------------------------------------- a recording client


class Client(BrokerClient):
    """A `BrokerClient` that also records every signal the broker sends (after `open`)."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.signals: list[Message] = []
        self.bus.add_message_handler(self._record)

    def _record(self, msg: Message) -> bool:
        if msg.message_type is MessageType.SIGNAL and msg.sender != "org.freedesktop.DBus":
            self.signals.append(msg)
        return False

    @classmethod
    async def open(cls, address: str, record: bool = True) -> Client:
        base = await BrokerClient.connect("address", address)
        client = cls(base.bus, base.where)
        if record:
            await client._add_match(f"type='signal',sender='{BUS_NAME}'")
        return client

    @property
    def unique_name(self) -> str:
        return str(self.bus.unique_name)

    def since(self, mark: int, member: str, path: str | None = None) -> list[Message]:
        return [
            m
            for m in self.signals[mark:]
            if m.member == member and (path is None or m.path == path)
        ]

    async def raw_spawn(
        self, name: str, options: dict[str, Variant], fds: Sequence[int], index: int = 0
    ) -> Message:
        """Spawn with exactly these fds and this index: the reply, error or not."""
        reply = await self.bus.call(
            Message(
                destination=BUS_NAME,
                path=MANAGER_PATH,
                interface=MANAGER_IFACE,
                member="Spawn",
                signature="sa{sv}h",
                body=[name, options, index],
                unix_fds=list(fds),
            )
        )
        assert reply is not None
        return reply

    async def props(self, path: str) -> dict[str, Any]:
        return await self.backend(path)

    async def list_ids(self) -> list[str]:
        return [b["id"] for b in await self.list_backends()]


async def spawn(
    c: BrokerClient, fake: Fake, tmp: Path, options: dict[str, Any] | None = None
) -> tuple[str, dict[str, Any]]:
    """Spawn ``fake`` on a fresh socket of the right kind; (object path, its properties)."""
    s = socket_for(fake, tmp)
    try:
        path = await c.spawn(fake.name, s.fileno(), options)
    finally:
        s.close()
    return path, await c.backend(path)


def error_of(reply: Message) -> tuple[str, str]:
    assert reply.message_type is MessageType.ERROR, f"expected an error, got {reply.body}"
    return reply.error_name or "", reply.body[0] if reply.body else ""


@dataclass
class Timer:
    start: float = field(default_factory=time.monotonic)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start
