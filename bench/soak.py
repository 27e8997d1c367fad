"""The 1,000-backend soak: run as a slow test (tests/test_soak.py) and as a bench scenario.

    .venv/bin/python bench/soak.py [--backends 1000]

N backends are spawned by three clients while descriptors change underneath: half are
stopped by their client, a quarter by their client leaving the bus, the rest are detached,
survive a SIGKILL of the daemon, are re-adopted by a new one and stopped there. At the end:
no backend process is left (alive or zombie), the daemon's fd count is back to a fresh
daemon's, and every backend's Exited signal was seen exactly once.

This process makes itself a child subreaper: backends orphaned by the killed daemon become
its children (as they would become systemd's), and it reaps exactly those.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from busutil import Daemon, PrivateBus, Tree, descriptor
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from vhostuserd.client import BrokerClient


@dataclass
class SoakResult:
    spawned: int = 0
    stopped_by_client: int = 0
    stopped_by_disconnect: int = 0
    readopted: int = 0
    exited_signals: Counter[str] = field(default_factory=Counter)
    leftover: list[str] = field(default_factory=list)
    fd_baseline: int = 0
    fd_end: int = 0
    descriptor_changes: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        once = (
            all(v == 1 for v in self.exited_signals.values())
            and len(self.exited_signals) == self.spawned
        )
        return (
            once
            and not self.leftover
            and self.fd_end == self.fd_baseline
            and not self.errors
            and self.readopted == self.spawned - self.stopped_by_client - self.stopped_by_disconnect
        )

    def summary(self) -> str:
        twice = sum(1 for v in self.exited_signals.values() if v > 1)
        return (
            f"{self.spawned} spawned; {self.stopped_by_client} stopped by clients, "
            f"{self.stopped_by_disconnect} by disconnecting owners, {self.readopted} detached and "
            f"re-adopted after SIGKILL; Exited seen for {len(self.exited_signals)} "
            f"({twice} more than once); "
            f"{len(self.leftover)} processes left; daemon fds {self.fd_baseline} -> {self.fd_end}; "
            f"{self.descriptor_changes} descriptor changes; {self.seconds:.1f} s"
            + (f"; errors: {self.errors[:3]}" if self.errors else "")
        )


def _become_subreaper() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)


def _marked(comm: str) -> list[tuple[int, str, int]]:
    """(pid, state, ppid) of every process whose name is ``comm``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        name = raw[raw.index(b"(") + 1 : raw.rindex(b")")].decode(errors="replace")
        if name == comm:
            fields = raw.rsplit(b")", 1)[1].split()
            out.append((int(entry), fields[0].decode(), int(fields[1])))
    return out


def _reap_ours(comm: str) -> None:
    for pid, state, ppid in _marked(comm):
        if state == "Z" and ppid == os.getpid():
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


async def _wait(cond: Any, what: str, timeout: float, comm: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if comm:
            _reap_ours(comm)
        if cond():
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


def run_soak(n: int = 1000) -> SoakResult:
    _become_subreaper()
    res = SoakResult()
    tmp = tempfile.mkdtemp(prefix="vhostuserd-soak-")
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else tmp
    state_dir = tempfile.mkdtemp(prefix="vhostuserd-soak-state-", dir=shm)
    comm = "vusoak" + os.urandom(3).hex()  # the backends' process name: 12 chars, unique
    bindir = Path(tmp) / "bin"
    bindir.mkdir()
    shutil.copy("/bin/sleep", bindir / comm)
    backend = bindir / "backend"
    backend.write_text(
        '#!/bin/sh\n[ "$1" = --print-capabilities ] && { echo \'{"type":"gpu"}\'; exit 0; }\n'
        f"exec {bindir / comm} 100000\n"
    )
    backend.chmod(0o755)
    tree = Tree.make(Path(tmp) / "tree")
    tree.write("data", "50-soak.json", descriptor("gpu", str(backend)))
    bus = PrivateBus()
    args = (
        "--grace-period",
        "1",
        "--max-backends",
        str(2 * n),
        "--max-backends-per-user",
        str(2 * n),
        "--state-dir",
        state_dir,
    )
    started = time.monotonic()
    daemon = Daemon(bus, tree, *args)
    try:
        res.fd_baseline = daemon.fd_count()

        async def main() -> None:
            mon = await MessageBus(bus_address=bus.address).connect()

            def on_exited(msg: Message) -> bool:
                if msg.message_type is MessageType.SIGNAL and msg.member == "Exited" and msg.path:
                    res.exited_signals[msg.path] += 1
                return False

            mon.add_message_handler(on_exited)
            await mon.call(
                Message(
                    destination="org.freedesktop.DBus",
                    path="/org/freedesktop/DBus",
                    interface="org.freedesktop.DBus",
                    member="AddMatch",
                    signature="s",
                    body=[
                        "type='signal',interface='org.vhostuserd.Broker1.Backend',member='Exited'"
                    ],
                )
            )
            churn_stop = asyncio.Event()

            async def churn() -> None:
                i = 0
                while not churn_stop.is_set():
                    tree.write(
                        "sysconf",
                        f"70-churn-{i % 7}.json",
                        descriptor("net", description=f"v{i}"),
                        atomic=True,
                    )
                    if i % 5 == 0:
                        (tree.dir("sysconf") / f"70-churn-{(i + 3) % 7}.json").unlink(
                            missing_ok=True
                        )
                    res.descriptor_changes += 1
                    i += 1
                    await asyncio.sleep(0.02)

            async def spawn_some(c: BrokerClient, count: int, detach: bool) -> list[str]:
                paths, keep = [], []
                for _ in range(count):
                    a, b = socket.socketpair()
                    try:
                        paths.append(
                            await c.spawn(
                                "50-soak.json", b.fileno(), {"settle-ms": 0, "detach": detach}
                            )
                        )
                    except Exception as e:  # noqa: BLE001 - recorded, fails the soak
                        res.errors.append(f"spawn: {e}")
                    b.close()
                    keep.append(a)
                for a in keep:
                    a.close()
                return paths

            churner = asyncio.ensure_future(churn())
            stoppers = await BrokerClient.connect("address", bus.address)
            leavers = await BrokerClient.connect("address", bus.address)
            detachers = await BrokerClient.connect("address", bus.address)
            half, quarter = n // 2, n // 4
            rest = n - half - quarter
            to_stop, to_leave, detached = await asyncio.gather(
                spawn_some(stoppers, half, False),
                spawn_some(leavers, quarter, False),
                spawn_some(detachers, rest, True),
            )
            res.spawned = len(to_stop) + len(to_leave) + len(detached)

            async def stop_all(c: BrokerClient, paths: list[str]) -> int:
                done = 0
                for p in paths:
                    try:
                        await c.stop(p)
                        done += 1
                    except Exception as e:  # noqa: BLE001
                        res.errors.append(f"stop: {e}")
                return done

            await leavers.close()
            res.stopped_by_client = await stop_all(stoppers, to_stop)
            res.stopped_by_disconnect = len(to_leave)
            await detachers.close()
            await stoppers.close()
            expect = len(to_stop) + len(to_leave)
            await _wait(
                lambda: len(res.exited_signals) >= expect, f"{expect} Exited signals", 60, comm
            )
            churn_stop.set()
            await churner
            # The detached ones outlive a SIGKILLed daemon and come back under a new one.
            daemon.stop(signal.SIGKILL)
            new = Daemon(bus, tree, *args)
            nonlocal_new.append(new)
            async with await BrokerClient.connect("address", bus.address) as admin:
                listed = [b for b in await admin.list_backends() if b["state"] == "running"]
                res.readopted = len(listed)
                await stop_all(admin, [b["object"] for b in listed])
            await _wait(
                lambda: len(res.exited_signals) >= res.spawned,
                f"{res.spawned} Exited signals",
                60,
                comm,
            )
            await _wait(lambda: not _marked(comm), "every backend process to be gone", 30, comm)
            # Lingering objects go away, and with them their last fds.
            await _wait(
                lambda: new.fd_count() == res.fd_baseline, f"fds back to {res.fd_baseline}", 15
            )
            mon.disconnect()

        nonlocal_new: list[Daemon] = []
        try:
            asyncio.run(main())
        except TimeoutError as e:
            res.errors.append(str(e))
        if nonlocal_new:
            res.fd_end = nonlocal_new[0].fd_count()
            nonlocal_new[0].assert_clean_log()
            nonlocal_new[0].stop()
        _reap_ours(comm)
        res.leftover = [f"pid {pid} state {st} ppid {pp}" for pid, st, pp in _marked(comm)]
        daemon.assert_clean_log()
    finally:
        daemon.stop()
        bus.close()
        for pid, _, _ in _marked(comm):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        _reap_ours(comm)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(state_dir, ignore_errors=True)
    res.seconds = time.monotonic() - started
    ctypes.CDLL(None, use_errno=True).prctl(36, 0, 0, 0, 0)  # no longer a subreaper
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", type=int, default=1000)
    a = ap.parse_args()
    r = run_soak(a.backends)
    print(("PASS " if r.ok else "FAIL ") + r.summary())
    sys.exit(0 if r.ok else 1)


if __name__ == "__main__":
    main()
