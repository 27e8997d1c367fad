"""Benchmark of the directory watcher (P2) and of the idle daemon's wake-ups (P8), each next
to a floor measured in the same run.

    .venv/bin/python bench/bench_watch.py [--quick] [--json bench/out/watch.json]

Rows:
  P2 KIND       file change -> IndexChanged received by a client, p50/p95 ms, for each kind
                of change: atomic rename, in-place write, delete, mask (truncate to zero
                length), symlink swap, directory removed, directory created. The floor is the
                same changes seen by a minimal raw-inotify process on the same bus
                (bench/inotify_floor.py: no coalescing, no index, one signal per read(2)
                that returned events), in a second pass with the daemon stopped, so the
                two never compete for the CPU.
  P8 KIND       daemon wake-ups per second over 10 s, all threads: the growth of voluntary +
                involuntary context switches summed over /proc/PID/task/*/status. Idle with
                no backend, and with 100 supervised idle `sleep` backends, with
                --idle-timeout 30 as the system unit runs it; and with 100 backends and no
                idle timeout (what the watcher and the supervisor cost without idle exit).
                The floor is the private dbus-daemon over the same 10 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

import report
from bench_broker import pct
from bench_spawn import write_backend
from busutil import MANAGER_PATH, Daemon, PrivateBus, Tree, descriptor
from dbus_fast import Message
from dbus_fast.aio import MessageBus

from vhostuserd.client import BrokerClient

FLOOR_PATH = "/org/vhostuserd/BenchFloor"
WAKE_SECONDS = 10.0
P2_GOAL_MS = 5.0
P8_GOAL = 1.0
Step = Callable[[], None]


# ---------------------------------------------------------------- P2


def write_atomic(path: Path, data: str) -> None:
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(data)
    os.rename(tmp, path)


def overwrite(path: Path, data: str) -> None:
    """In place, in one write(2), never shorter than before: no reader sees it empty."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)


def doc(i: int, btype: str = "gpu") -> str:
    # Fixed width, so an in-place write never leaves a tail of the old content.
    return json.dumps(descriptor(btype, "/usr/bin/true", f"v{i:06d}"))


class Kinds:
    """The changes P2 measures, each with what puts things back for the next sample."""

    def __init__(self, tree: Tree) -> None:
        self.tree = tree
        self.sysdir = tree.dir("sysconf")
        self.file = self.sysdir / "60-bench.json"
        self.userdir = tree.dir("user")
        self.link = self.userdir / "61-link.json"
        self.targets = tree.root / "targets"
        self.targets.mkdir()
        (self.targets / "gpu.json").write_text(doc(0, "gpu"))
        (self.targets / "input.json").write_text(doc(0, "input"))
        write_atomic(self.file, doc(0))
        self.link.symlink_to(self.targets / "gpu.json")
        self.i = 0
        self.flip = False

    def ops(self) -> list[tuple[str, Step | None, Step, Step | None]]:
        """(kind, prepare, change, restore) in the order they run."""

        def remove_dir() -> None:
            shutil.rmtree(self.sysdir)

        return [
            ("atomic rename", None, self.atomic, None),
            ("in-place write", None, self.in_place, None),
            ("delete", None, self.file.unlink, lambda: write_atomic(self.file, self.next())),
            (
                "mask",
                None,
                lambda: os.truncate(self.file, 0),
                lambda: write_atomic(self.file, self.next()),
            ),
            ("symlink swap", None, self.swap, None),
            ("directory removed", None, remove_dir, self.make_dir),
            ("directory created", remove_dir, self.make_dir, remove_dir),
        ]

    def reset(self) -> None:
        """The state the first kind starts from, whatever the last one left."""
        self.sysdir.mkdir(exist_ok=True)
        write_atomic(self.file, self.next())

    def next(self) -> str:
        self.i += 1
        return doc(self.i)

    def atomic(self) -> None:
        write_atomic(self.file, self.next())

    def in_place(self) -> None:
        overwrite(self.file, self.next())

    def swap(self) -> None:
        self.flip = not self.flip
        tmp = self.userdir / ".61-link.json.new"
        tmp.symlink_to(self.targets / ("input.json" if self.flip else "gpu.json"))
        os.rename(tmp, self.link)

    def make_dir(self) -> None:
        self.sysdir.mkdir()
        write_atomic(self.file, self.next())


async def change_latencies(
    address: str, kinds: Kinds, samples: int, path: str, member: str
) -> dict[str, list[float]]:
    """For each kind: ms from the change to the first signal ``member`` on ``path``."""
    bus = await MessageBus(bus_address=address).connect()
    got: asyncio.Queue[float] = asyncio.Queue()

    def handler(msg: Message) -> bool:
        if msg.member == member and msg.path == path:
            got.put_nowait(time.perf_counter())
        return False

    bus.add_message_handler(handler)
    await bus.call(
        Message(
            destination="org.freedesktop.DBus",
            path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus",
            member="AddMatch",
            signature="s",
            body=[f"type='signal',path='{path}',member='{member}'"],
        )
    )

    async def quiet() -> None:
        """Let every signal of the last change arrive, then forget them."""
        await asyncio.sleep(0.05)
        while not got.empty():
            got.get_nowait()

    out: dict[str, list[float]] = {}
    await quiet()
    for kind, prepare, change, restore in kinds.ops():
        if prepare is not None:
            prepare()
            await asyncio.wait_for(got.get(), 10)
            await quiet()
        out[kind] = []
        for _ in range(samples):
            t0 = time.perf_counter()
            change()
            t1 = await asyncio.wait_for(got.get(), 10)
            out[kind].append((t1 - t0) * 1000)
            await quiet()
            if restore is not None:
                restore()
                await asyncio.wait_for(got.get(), 10)
                await quiet()
    bus.disconnect()
    return out


# ---------------------------------------------------------------- P8


def switches(pid: int) -> dict[int, int]:
    """Context switches so far (voluntary + involuntary) of each thread of ``pid``."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            text = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except FileNotFoundError:
            continue
        n = 0
        for line in text.splitlines():
            if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                n += int(line.split()[1])
        out[int(tid)] = n
    return out


def wakeups(pids: list[int], seconds: float) -> list[tuple[float, int]]:
    """(wake-ups per second over ``seconds``, threads) for each pid, sampled together."""
    before = [switches(p) for p in pids]
    time.sleep(seconds)
    after = [switches(p) for p in pids]
    return [
        (sum(n - b.get(tid, 0) for tid, n in a.items()) / seconds, len(a))
        for b, a in zip(before, after, strict=True)
    ]


async def spawn_idle(c: BrokerClient, name: str, n: int) -> tuple[list[str], list[socket.socket]]:
    paths, socks = [], []
    for _ in range(n):
        a, b = socket.socketpair()
        paths.append(await c.spawn(name, b.fileno(), {"settle-ms": 0}))
        b.close()
        socks.append(a)
    return paths, socks


async def stop_all(c: BrokerClient, paths: list[str], socks: list[socket.socket]) -> None:
    for i in range(0, len(paths), 50):
        await asyncio.gather(*(c.stop(p) for p in paths[i : i + 50]), return_exceptions=True)
    for a in socks:
        a.close()


def wake_row(
    bus: PrivateBus, tree: Tree, n_backends: int, idle_timeout: float, seconds: float
) -> tuple[float, float, int]:
    """(daemon wake-ups/s, dbus-daemon wake-ups/s, daemon threads) of a daemon started with
    ``--idle-timeout idle_timeout``, idle with ``n_backends`` supervised idle backends, from
    ``idle_timeout`` + 1 s after the last call (when the idle-exit check runs, if any)."""
    d = Daemon(
        bus,
        tree,
        "--idle-timeout",
        f"{idle_timeout:g}",
        "--max-backends",
        str(n_backends + 10),
        "--max-backends-per-user",
        str(n_backends + 10),
        "--state-dir",
        tempfile.mkdtemp(prefix="vhostuserd-bench-state-", dir=str(tree.root)),
    )
    settle = max(2.0, idle_timeout + 1.0) if n_backends else 2.0  # start-up work is over

    async def measure() -> tuple[float, float, int]:
        async with await BrokerClient.connect("address", bus.address) as c:
            paths, socks = await spawn_idle(c, "50-sleep.json", n_backends)
            try:
                await asyncio.sleep(settle)
                loop = asyncio.get_running_loop()
                (o, t), (f, _) = await loop.run_in_executor(
                    None, wakeups, [d.proc.pid, bus.proc.pid], seconds
                )
                return o, f, t
            finally:
                await stop_all(c, paths, socks)

    try:
        return asyncio.run(measure())
    finally:
        d.stop()


# ---------------------------------------------------------------- the rows


def run(quick: bool) -> tuple[list[dict[str, Any]], dict[str, list[float]]]:
    rows: list[dict[str, Any]] = []
    samples: dict[str, list[float]] = {}

    def row(*args: Any, **kw: Any) -> None:
        rows.append(report.row(*args, **kw))

    with tempfile.TemporaryDirectory() as tmp:
        tree = Tree.make(Path(tmp) / "t")
        kinds = Kinds(tree)
        bus = PrivateBus()
        n_samples = 10 if quick else 40
        try:
            # Two passes of the same changes, one watcher each, so neither takes CPU from
            # the other on a small machine: the daemon, then the floor process alone.
            d = Daemon(bus, tree)
            try:
                time.sleep(0.5)
                lat = asyncio.run(
                    change_latencies(bus.address, kinds, n_samples, MANAGER_PATH, "IndexChanged")
                )
            finally:
                d.stop()
            kinds.reset()
            helper = subprocess.Popen(
                [
                    sys.executable,
                    str(HERE / "inotify_floor.py"),
                    bus.address,
                    FLOOR_PATH,
                    str(kinds.sysdir),
                    str(kinds.userdir),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert helper.stdout and helper.stdout.readline().strip() == "ready"
                floor = asyncio.run(
                    change_latencies(bus.address, kinds, n_samples, FLOOR_PATH, "Seen")
                )
            finally:
                helper.terminate()
                helper.wait()
        finally:
            bus.close()
        for kind, mine in lat.items():
            base = floor[kind]
            samples[f"P2 {kind} -> IndexChanged (ms)"] = mine
            p95, f95 = pct(mine, 95), pct(base, 95)
            row(
                f"P2 {kind}",
                f"p95 <= {P2_GOAL_MS:g} ms",
                p95,
                f95,
                "ms",
                p95 / f95 if f95 else None,
                p95 <= P2_GOAL_MS,
                f"p50 {pct(mine, 50):.2f} ms (floor {pct(base, 50):.2f}), "
                f"max {max(mine):.1f} ms, {len(mine)} samples",
            )

    seconds = 3.0 if quick else WAKE_SECONDS
    n = 100
    with tempfile.TemporaryDirectory() as tmp:
        tree = Tree.make(Path(tmp) / "t")
        sleeper = write_backend(Path(tmp) / "sleep-backend", ignore_term=False)
        tree.write("data", "50-sleep.json", descriptor("gpu", sleeper))
        bus = PrivateBus()
        try:
            # What: (row, backends, --idle-timeout, note). The unit runs --idle-timeout 30;
            # with backends the idle check only starts once that has passed, so that row uses
            # 2 s to reach the same steady state inside the window.
            cases = [
                ("idle", 0, 30.0, "--idle-timeout 30 as the unit, no backend"),
                (
                    f"{n} backends",
                    n,
                    2.0,
                    (
                        f"{n} sleep backends, --idle-timeout 2 (the unit's "
                        "30, shortened to be past it)"
                    ),
                ),
                (f"{n} backends, no idle exit", n, 0.0, f"{n} sleep backends, --idle-timeout 0"),
            ]
            for what, backends, idle_timeout, note in cases:
                ours, floor, nthreads = wake_row(bus, tree, backends, idle_timeout, seconds)
                row(
                    f"P8 wake-ups {what}",
                    f"<= {P8_GOAL:g}/s",
                    ours,
                    floor,
                    "/s",
                    None,
                    ours <= P8_GOAL,
                    f"{note}; {nthreads} threads; floor = the dbus-daemon; over {seconds:g} s",
                )
        finally:
            bus.close()
    return rows, samples


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer samples, 3 s wake-up windows")
    ap.add_argument("--json", default=str(HERE / "out" / "watch.json"))
    a = ap.parse_args()
    rows, samples = run(a.quick)
    report.publish(rows, samples, a.json)


if __name__ == "__main__":
    main()
