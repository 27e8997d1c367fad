"""Benchmark of the broker on a real private bus, each number next to a floor measured in
the same run.

    .venv/bin/python bench/bench_broker.py [--quick] [--json bench/out/broker.json]

Rows:
  resolve      Resolve calls/s (sequential, one client) vs a dbus-fast service that returns
               a precomputed reply of the same shape, and vs the bus's own GetId; once on a
               quiet machine and once beside a CPU-bound neighbour (a process spinning on
               one core, started and stopped here). Ours and the floor alternate in blocks of
               100 calls, so that whatever else the machine does falls on both alike
  concurrent   50 clients x 200 Resolve: errors and calls/s vs the same load on the no-op
  one-file     Feed.update_files after one file changed, at 100 vs 10,000 descriptors
  cold-scan    Feed.rescan of 10,000 descriptors from nothing
  activation   first call on a bus where the daemon is not running (D-Bus activation) to
               its reply, vs `python -c 'import asyncio'`
  rss          daemon RSS when idle with the demo descriptor set

P2 (change -> IndexChanged, for each kind of change) and P8 (idle wake-ups) are in
bench_watch.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

import report
from busutil import BUS_NAME, MANAGER_PATH, VHOSTUSERD, Daemon, PrivateBus, Tree, descriptor
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

BENCH_NAME = "org.vhostuserd.Bench"


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def resolve_msg(dest: str, path: str, iface: str) -> Message:
    return Message(
        destination=dest,
        path=path,
        interface=iface,
        member="Resolve",
        signature="sas",
        body=["gpu", ["virgl"]],
    )


def getid_msg() -> Message:
    return Message(
        destination="org.freedesktop.DBus",
        path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus",
        member="GetId",
    )


async def sequential_rate(
    address: str, make: Any, n: int, latencies: list[float] | None = None
) -> float:
    bus = await MessageBus(bus_address=address).connect()
    for _ in range(50):
        await bus.call(make())
    t0 = time.perf_counter()
    for _ in range(n):
        t1 = time.perf_counter()
        r = await bus.call(make())
        if latencies is not None:
            latencies.append((time.perf_counter() - t1) * 1000)
        assert r.message_type is MessageType.METHOD_RETURN, r.body
    rate = n / (time.perf_counter() - t0)
    bus.disconnect()
    return rate


async def interleaved_rates(
    address: str,
    makes: list[Any],
    n: int,
    block: int = 100,
    latencies: list[list[float]] | None = None,
) -> list[float]:
    """Calls/s of each message kind, measured in alternating blocks on one connection each."""
    buses = [await MessageBus(bus_address=address).connect() for _ in makes]
    for bus, make in zip(buses, makes, strict=True):
        for _ in range(50):
            await bus.call(make())
    spent = [0.0] * len(makes)
    done = [0] * len(makes)
    while done[0] < n:
        for i, (bus, make) in enumerate(zip(buses, makes, strict=True)):
            t0 = time.perf_counter()
            for _ in range(block):
                t1 = time.perf_counter()
                r = await bus.call(make())
                if latencies is not None:
                    latencies[i].append((time.perf_counter() - t1) * 1000)
                assert r.message_type is MessageType.METHOD_RETURN, r.body
            spent[i] += time.perf_counter() - t0
            done[i] += block
    for bus in buses:
        bus.disconnect()
    return [d / s for d, s in zip(done, spent, strict=True)]


NEIGHBOUR = "while True: pass"


def start_neighbour() -> subprocess.Popen[bytes]:
    """A CPU-bound process on the machine, as a build or a guest would be."""
    return subprocess.Popen([sys.executable, "-c", NEIGHBOUR])


async def concurrent_rate(
    address: str, make: Any, clients: int, per_client: int
) -> tuple[float, int]:
    buses = [await MessageBus(bus_address=address).connect() for _ in range(clients)]
    errors = 0

    async def one(bus: MessageBus) -> None:
        nonlocal errors
        for _ in range(per_client):
            r = await bus.call(make())
            if r.message_type is not MessageType.METHOD_RETURN:
                errors += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(one(b) for b in buses))
    rate = clients * per_client / (time.perf_counter() - t0)
    for b in buses:
        b.disconnect()
    return rate, errors


def one_file_cost(n: int, repeats: int) -> tuple[float, float]:
    """(median update_files seconds, cold rescan seconds) at n descriptors."""
    from vhostuserd.core.index import Index
    from vhostuserd.core.lookup import Directory
    from vhostuserd.edges.watch import Feed

    with tempfile.TemporaryDirectory() as d:
        vu = Path(d) / "qemu/vhost-user"
        vu.mkdir(parents=True)
        body = json.dumps(descriptor("gpu", "/usr/bin/true"))
        for i in range(n):
            (vu / f"{i:05d}-gpu.json").write_text(body)
        dirs = [Directory("sysconf", str(vu))]
        t0 = time.perf_counter()
        feed = Feed(Index(dirs))
        feed.rescan()
        cold = time.perf_counter() - t0
        assert len(feed.index.descriptors) == n
        times = []
        target = vu / f"{n // 2:05d}-gpu.json"
        for i in range(repeats):
            target.write_text(json.dumps(descriptor("gpu", "/usr/bin/true", f"r{i}")))
            t0 = time.perf_counter()
            change = feed.update_files([str(target)])
            times.append(time.perf_counter() - t0)
            assert change.changed
        return statistics.median(times), cold


def cold_activation(tree: Tree, runs: int) -> tuple[list[float], list[float]]:
    act, floor = [], []
    for _ in range(runs):
        b = PrivateBus(env=tree.env())
        (b.servicedir / f"{BUS_NAME}.service").write_text(
            f"[D-BUS Service]\nName={BUS_NAME}\nExec={VHOSTUSERD} --user --idle-timeout 1 "
            f"--sysconfdir {tree.sysconfdir}\n"
        )
        b.reload()

        async def first(address: str) -> float:
            bus = await MessageBus(bus_address=address).connect()
            t0 = time.perf_counter()
            r = await bus.call(
                Message(
                    destination=BUS_NAME,
                    path=MANAGER_PATH,
                    member="ListDescriptors",
                    interface="org.vhostuserd.Broker1.Manager",
                    signature="s",
                    body=[""],
                )
            )
            dt = time.perf_counter() - t0
            assert r.message_type is MessageType.METHOD_RETURN, r.body
            bus.disconnect()
            return dt

        act.append(asyncio.run(first(b.address)) * 1000)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import asyncio"], check=True)
        floor.append((time.perf_counter() - t0) * 1000)
        deadline = time.monotonic() + 10
        while b.name_has_owner() and time.monotonic() < deadline:
            time.sleep(0.05)
        b.close()
    return act, floor


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def run(quick: bool) -> tuple[list[dict[str, Any]], dict[str, list[float]]]:
    n = 1000 if quick else 3000
    rows: list[dict[str, Any]] = []
    samples: dict[str, list[float]] = {}

    def row(*args: Any, **kw: Any) -> None:
        rows.append(report.row(*args, **kw))

    with tempfile.TemporaryDirectory() as tmp:
        tree = Tree.make(Path(tmp))
        from vhostuserd.demo import make_demo_tree

        tree.data.insert(0, Path(make_demo_tree(f"{tmp}/demo")))
        bus = PrivateBus()
        try:
            noop = subprocess.Popen(
                [sys.executable, str(HERE / "noop_server.py"), bus.address],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert noop.stdout and noop.stdout.readline().strip() == "ready"
            daemon = Daemon(bus, tree)
            # warm the probe cache so Resolve(gpu, [virgl]) answers from it
            asyncio.run(
                sequential_rate(
                    bus.address,
                    lambda: resolve_msg(BUS_NAME, MANAGER_PATH, "org.vhostuserd.Broker1.Manager"),
                    10,
                )
            )
            time.sleep(0.5)
            rss = rss_kb(daemon.proc.pid)

            def ours() -> Message:
                return resolve_msg(BUS_NAME, MANAGER_PATH, "org.vhostuserd.Broker1.Manager")

            def floor() -> Message:
                return resolve_msg(BENCH_NAME, "/org/vhostuserd/Bench", "org.vhostuserd.Bench.Noop")

            lat: list[list[float]] = [[], [], []]
            r_ours, r_floor, r_getid = asyncio.run(
                interleaved_rates(bus.address, [ours, floor, getid_msg], n, latencies=lat)
            )
            samples["P1 Resolve round trip (ms)"] = lat[0]
            samples["P1 floor: no-op method round trip (ms)"] = lat[1]
            row(
                "P1 resolve quiet",
                ">= 0.9x no-op",
                r_ours,
                r_floor,
                "calls/s",
                r_ours / r_floor,
                r_ours / r_floor >= 0.9,
                f"bus GetId {r_getid:.0f}/s (ratio {r_ours / r_getid:.2f}); "
                f"p50 {pct(lat[0], 50):.3f} vs {pct(lat[1], 50):.3f} ms",
            )
            neighbour = start_neighbour()
            try:
                time.sleep(0.3)
                lat_l: list[list[float]] = [[], []]
                l_ours, l_floor = asyncio.run(
                    interleaved_rates(bus.address, [ours, floor], n, latencies=lat_l)
                )
            finally:
                neighbour.kill()
                neighbour.wait()
            samples["P1 loaded: Resolve round trip (ms)"] = lat_l[0]
            samples["P1 loaded floor: no-op method round trip (ms)"] = lat_l[1]
            row(
                "P1 resolve loaded",
                ">= 0.9x no-op",
                l_ours,
                l_floor,
                "calls/s",
                l_ours / l_floor,
                l_ours / l_floor >= 0.9,
                f"beside `python -c '{NEIGHBOUR}'`; p50 {pct(lat_l[0], 50):.3f} vs "
                f"{pct(lat_l[1], 50):.3f} ms, p95 {pct(lat_l[0], 95):.3f} vs "
                f"{pct(lat_l[1], 95):.3f} ms",
            )
            c_ours, e_ours = asyncio.run(concurrent_rate(bus.address, ours, 50, 200))
            c_floor, _ = asyncio.run(concurrent_rate(bus.address, floor, 50, 200))
            row(
                "P7 concurrent",
                "0 errors, >= 0.8x P1",
                c_ours,
                c_floor,
                "calls/s",
                c_ours / r_ours,
                e_ours == 0 and c_ours / r_ours >= 0.8,
                f"{e_ours} errors; 50x200 on the no-op: {c_floor:.0f}/s",
            )
            row(
                "P6 rss idle",
                "<= 40 MB",
                rss / 1024,
                None,
                "MB",
                None,
                rss / 1024 <= 40,
                "demo set + Debian descriptors",
            )
            daemon.stop()
            noop.terminate()
            noop.wait()
        finally:
            bus.close()
        small, _ = one_file_cost(100, 50 if quick else 200)
        big, cold = one_file_cost(10_000, 50 if quick else 200)
        row(
            "P3 one-file change",
            "<= 2x (10k vs 100)",
            big * 1e3,
            small * 1e3,
            "ms",
            big / small,
            big / small <= 2,
            "Feed.update_files, median",
        )
        row(
            "P3 cold scan 10k",
            "<= 1 s",
            cold,
            None,
            "s",
            None,
            cold <= 1.0,
            "Feed.rescan from nothing",
        )
        act, fl = cold_activation(tree, 3 if quick else 5)
        a, f = statistics.median(act), statistics.median(fl)
        row(
            "P5 cold activation",
            "<= 3x import asyncio",
            a,
            f,
            "ms",
            a / f,
            a / f <= 3,
            "median first call -> reply",
        )

    return rows, samples


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer samples")
    ap.add_argument("--json", default=str(HERE / "out" / "broker.json"))
    args = ap.parse_args()
    rows, samples = run(args.quick)
    report.publish(rows, samples, args.json)


if __name__ == "__main__":
    main()
