"""Benchmark of spawning and supervision (P4, P6 with 1,000 backends), against floors
measured in the same run.

    .venv/bin/python bench/bench_spawn.py [--quick] [--backends 1000]

Rows:
  P4 spawn        Spawn round trip (settle-ms 0) vs posix_spawn of the same binary by the client
                  plus one no-op D-Bus call (what a client would do without the broker)
  P4 stop         Stop of a SIGTERM-honouring backend, round trip
  P4 sigkill      Stop of a SIGTERM-ignoring backend: time past the grace period
  P4 cgroup       what placing a backend in its own cgroup costs: mkdir, posix_spawn of the
                  /bin/sh launcher that enters it and execs /bin/true, its exit, rmdir; vs
                  posix_spawn of /bin/true and its exit (no broker, no D-Bus)
  P6 per backend  daemon RSS growth per supervised `sleep` backend, and its thread count
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
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
from busutil import Daemon, PrivateBus, Tree, descriptor
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from vhostuserd.client import BrokerClient
from vhostuserd.edges import procs

GRACE = 0.5


def write_backend(path: Path, ignore_term: bool) -> str:
    """A minimal conventions-following backend: answers the probe, then sleeps on its socket."""
    trap = "trap '' TERM\n" if ignore_term else ""
    path.write_text(
        "#!/bin/sh\n"
        '[ "$1" = --print-capabilities ] && { echo \'{"type":"gpu"}\'; exit 0; }\n'
        f"{trap}exec sleep 100000\n"
    )
    path.chmod(0o755)
    return str(path)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


async def spawn_round_trips(c: BrokerClient, name: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        a, b = socket.socketpair()
        t0 = time.perf_counter()
        path = await c.spawn(name, b.fileno(), {"settle-ms": 0})
        out.append((time.perf_counter() - t0) * 1000)
        b.close()
        await c.stop(path)
        a.close()
    return out


async def floor_round_trips(address: str, binary: str, n: int) -> list[float]:
    bus = await MessageBus(bus_address=address).connect()
    reaper = procs.Reaper(asyncio.get_running_loop())
    reaper.install()
    out = []
    null = procs.open_devnull()
    try:
        for _ in range(n):
            a, b = socket.socketpair()
            t0 = time.perf_counter()
            pid = procs.spawn([binary, "--fd=3"], fds={0: null, 1: null, 2: null, 3: b.fileno()})
            exited = reaper.watch(pid)
            r = await bus.call(
                Message(
                    destination="org.vhostuserd.Bench",
                    path="/org/vhostuserd/Bench",
                    interface="org.vhostuserd.Bench.Noop",
                    member="Ping",
                )
            )
            out.append((time.perf_counter() - t0) * 1000)
            assert r.message_type is MessageType.METHOD_RETURN
            procs.kill_group(pid)
            await exited
            a.close()
            b.close()
    finally:
        os.close(null)
        reaper.uninstall()
        bus.disconnect()
    return out


def placement_times(n: int) -> tuple[list[float], list[float], str]:
    """(with the cgroup launcher, bare, where) in ms: spawn to exit of /bin/true."""
    from vhostuserd.edges.cgroup import Cgroups

    cg = Cgroups.setup(tempfile.mkdtemp(prefix="vhostuserd-bench-cg-"))
    null = procs.open_devnull()
    bare, placed = [], []
    try:
        for i in range(n):
            t0 = time.perf_counter()
            pid = procs.spawn(["/bin/true"], fds={0: null, 1: null, 2: null})
            os.waitpid(pid, 0)
            bare.append((time.perf_counter() - t0) * 1000)
            if not cg.enabled:
                continue
            t0 = time.perf_counter()
            path = cg.create(f"bench-{i}")
            pid = procs.spawn([*cg.launcher(path), "/bin/true"], fds={0: null, 1: null, 2: null})
            _, status = os.waitpid(pid, 0)
            assert status == 0, status
            cg.remove(path)
            placed.append((time.perf_counter() - t0) * 1000)
    finally:
        os.close(null)
        cg.release()
    return placed, bare, cg.describe()


async def stop_times(c: BrokerClient, name: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        a, b = socket.socketpair()
        path = await c.spawn(name, b.fileno(), {"settle-ms": 0})
        b.close()
        await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        await c.stop(path)
        out.append((time.perf_counter() - t0) * 1000)
        a.close()
    return out


async def many_backends(
    c: BrokerClient, name: str, n: int, pid: int
) -> tuple[int, int, int, float]:
    """(RSS before, RSS after n backends, threads after, seconds to spawn them)."""
    await asyncio.sleep(0.5)
    before = rss_kb(pid)
    socks, paths = [], []
    t0 = time.perf_counter()
    for _ in range(n):
        a, b = socket.socketpair()
        paths.append(await c.spawn(name, b.fileno(), {"settle-ms": 0}))
        b.close()
        socks.append(a)
    took = time.perf_counter() - t0
    await asyncio.sleep(1.0)
    after = rss_kb(pid)
    nthreads = threads(pid)
    # Stop them all before the daemon goes: a daemon stopped by SIGTERM leaves its backends
    # running (to re-adopt them), which here would leave them behind.
    for i in range(0, len(paths), 50):
        await asyncio.gather(*(c.stop(p) for p in paths[i : i + 50]))
    for a in socks:
        a.close()
    return before, after, nthreads, took


def run(quick: bool, n_backends: int) -> tuple[list[dict[str, Any]], dict[str, list[float]]]:
    rows: list[dict[str, Any]] = []
    samples: dict[str, list[float]] = {}

    def row(*args: Any, **kw: Any) -> None:
        rows.append(report.row(*args, **kw))

    n = 30 if quick else 100
    with tempfile.TemporaryDirectory() as tmp:
        bindir = Path(tmp) / "bin"
        bindir.mkdir()
        tree = Tree.make(Path(tmp) / "t")
        term = write_backend(bindir / "honours-term", ignore_term=False)
        ignore = write_backend(bindir / "ignores-term", ignore_term=True)
        tree.write("data", "50-term.json", descriptor("gpu", term))
        tree.write("data", "60-ignore.json", descriptor("gpu", ignore))
        # Where the state dir lives in production: tmpfs (/run, $XDG_RUNTIME_DIR).
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else tmp
        state_dir = tempfile.mkdtemp(prefix="vhostuserd-bench-state-", dir=shm)
        bus = PrivateBus()
        noop = subprocess.Popen(
            [sys.executable, str(HERE / "noop_server.py"), bus.address],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert noop.stdout and noop.stdout.readline().strip() == "ready"
        d = Daemon(
            bus,
            tree,
            "--grace-period",
            str(GRACE),
            "--max-backends",
            str(n_backends + 10),
            "--max-backends-per-user",
            str(n_backends + 10),
            "--state-dir",
            state_dir,
        )
        try:

            async def main() -> None:
                async with await BrokerClient.connect("address", bus.address) as c:
                    await spawn_round_trips(c, "50-term.json", 5)  # warm up
                    ours = await spawn_round_trips(c, "50-term.json", n)
                    floor = await floor_round_trips(bus.address, term, n)
                    samples["P4 spawn (ms)"] = ours
                    samples["P4 floor: posix_spawn + call (ms)"] = floor
                    m, f = statistics.median(ours), statistics.median(floor)
                    row(
                        "P4 spawn",
                        "<= 1.5x fork/exec+call",
                        m,
                        f,
                        "ms",
                        m / f,
                        m / f <= 1.5,
                        f"median of {n}; p95 {sorted(ours)[int(0.95 * (n - 1))]:.2f} ms",
                    )
                    placed, bare, where = placement_times(n)
                    if placed:
                        samples["P4 cgroup: launcher into a new cgroup (ms)"] = placed
                        samples["P4 cgroup floor: posix_spawn /bin/true (ms)"] = bare
                        pm, bm = statistics.median(placed), statistics.median(bare)
                        row(
                            "P4 cgroup placement",
                            "documented",
                            pm,
                            bm,
                            "ms",
                            pm / bm,
                            True,
                            f"median of {n}: +{pm - bm:.2f} ms per backend start, "
                            "off the Spawn reply's path "
                            f"(the launcher runs after posix_spawn returns); {where}",
                        )
                    else:
                        row(
                            "P4 cgroup placement",
                            "documented",
                            0.0,
                            statistics.median(bare),
                            "ms",
                            None,
                            True,
                            f"not measured: {where}",
                        )
                    stops = await stop_times(c, "50-term.json", n)
                    samples["P4 stop (ms)"] = stops
                    row(
                        "P4 stop",
                        "<= 20 ms",
                        statistics.median(stops),
                        None,
                        "ms",
                        None,
                        statistics.median(stops) <= 20,
                        f"median of {n}, SIGTERM-honouring",
                    )
                    kills = [
                        t - GRACE * 1000
                        for t in await stop_times(c, "60-ignore.json", 5 if quick else 10)
                    ]
                    worst = max(kills, key=abs)
                    row(
                        "P4 sigkill error",
                        "within +-50 ms",
                        worst,
                        None,
                        "ms",
                        None,
                        abs(worst) <= 50,
                        f"grace {GRACE}s; errors {', '.join(f'{k:.1f}' for k in kills)} ms",
                    )
                    before, after, nthreads, took = await many_backends(
                        c, "50-term.json", n_backends, d.proc.pid
                    )
                    idle_mb = before / 1024
                    per = (after - before) / n_backends
                    row(
                        "P6 rss idle",
                        "<= 40 MB",
                        idle_mb,
                        None,
                        "MB",
                        None,
                        idle_mb <= 40,
                        "before the backends",
                    )
                    row(
                        "P6 rss per backend",
                        "<= 20 KB",
                        per,
                        None,
                        "KB",
                        None,
                        per <= 20,
                        f"{n_backends} sleep backends: "
                        f"{before / 1024:.1f} -> {after / 1024:.1f} MB, "
                        f"{nthreads} threads, spawned in {took:.1f} s",
                    )

            asyncio.run(main())
        finally:
            d.stop()
            noop.terminate()
            noop.wait()
            bus.close()
            subprocess.run(["pkill", "-KILL", "-f", f"{tmp}/bin"], check=False)
            import shutil

            shutil.rmtree(state_dir, ignore_errors=True)
    return rows, samples


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--backends", type=int, default=1000)
    ap.add_argument("--json", default=str(HERE / "out" / "spawn.json"))
    a = ap.parse_args()
    rows, samples = run(a.quick, a.backends)
    report.publish(rows, samples, a.json)


if __name__ == "__main__":
    main()
