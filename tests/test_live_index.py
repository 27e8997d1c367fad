"""The running daemon keeps its index current as the descriptor directories change
(docs/contract.md sections 1 and 3: Generation, IndexChanged, ListDescriptors, Diagnostics).

Every test drives the real daemon on a real private bus with real file operations and
real inotify. Signal counts are exact: `Listener.settle` proves that the daemon has
processed every event before the count is taken.

How the index follows each kind of file operation (edits in place, masks, renames, symlinks,
directories that come, go and move, bursts) is the watcher's and the index's rule, tested
in-process in tests/test_index_watch.py (and tests/test_watcher.py, tests/test_index_model.py).
Here: a change reaches clients as one IndexChanged with the Generation and ListDescriptors to
match, a broken file as a Diagnostics change, the daemon answers Resolve through a storm of
changes, and it watches with no thread of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import threading
import time
from collections.abc import Callable
from typing import Any

from busutil import Daemon, PrivateBus, Tree, descriptor, fake_backend, run
from helpers_live import (
    MANAGER_IFACE,
    PROPS_IFACE,
    CallFailed,
    Listener,
    expected_rows,
    listen,
    unwrap,
    write_atomic,
)

from vhostuserd.bus.manager import descriptor_path

StartDaemon = Callable[..., Daemon]


def doc(btype: str = "gpu", binary: str = "/usr/bin/true", description: str = "test") -> str:
    return json.dumps(descriptor(btype, binary, description))


def live(bus: PrivateBus, tree: Tree, d: Daemon, body: Callable[[Listener], Any]) -> None:
    """Run ``body`` with a listener, then check the daemon logged no exception."""

    async def main() -> None:
        async with await listen(bus.address) as listener:
            await body(listener)

    run(main())
    assert d.proc.poll() is None, d.log()
    d.assert_clean_log()


def test_added_file_appears_with_one_index_changed(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    tree.write("data", "50-a.json", descriptor("gpu"))
    d = start_daemon()

    async def body(L: Listener) -> None:
        g0, m = await L.generation(), L.mark()
        await L.assert_matches_disk(tree)
        tree.write("sysconf", "40-b.json", descriptor("input", description="new"))
        await L.wait_names(["40-b.json", "50-a.json"])
        await L.settle(tree.dir("sysconf"))
        await L.assert_generation(m, g0, 1)
        items = await L.assert_matches_disk(tree)
        assert items[0]["tier"] == "sysconf" and items[0]["type"] == "input"
        assert await L.diagnostics() == []

    live(bus, tree, d, body)


def test_broken_sysconf_file_shadows_valid_data_file_until_fixed(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    tree.write("data", "50-a.json", descriptor("gpu", description="data tier"))
    d = start_daemon()

    async def body(L: Listener) -> None:
        g0, m = await L.generation(), L.mark()
        bad = tree.write("sysconf", "50-a.json", {"type": "gpu", "binary": "relative/path"})
        await L.wait_rows([], "the broken file to shadow the data file")
        await L.settle(bad.parent)
        await L.assert_generation(m, g0, 1)
        await L.assert_matches_disk(tree)
        (diag,) = await L.diagnostics()
        assert diag[:2] == (str(bad), "error") and "/binary" in diag[2], diag
        diag_signals = [
            unwrap(s.body[1])
            for s in L.since(m, "PropertiesChanged", interface=PROPS_IFACE)
            if s.body[0] == MANAGER_IFACE and "Diagnostics" in s.body[1]
        ]
        assert diag_signals and [tuple(x) for x in diag_signals[-1]["Diagnostics"]] == [diag]
        m1 = L.mark()
        write_atomic(bad, doc("gpu", description="fixed"))
        await L.wait_rows(lambda rows: rows and rows[0][4] == "fixed", "the fixed sysconf file")
        await L.settle(bad.parent)
        await L.assert_generation(m1, g0 + 1, 1)
        items = await L.assert_matches_disk(tree)
        assert items[0]["tier"] == "sysconf"
        assert await L.diagnostics() == []

    live(bus, tree, d, body)


# ---------------------------------------------------------------- the storm

STORM_RENAMES = 1000
STORM_CLIENTS = 50
STORM_FILES = 5


def test_rename_storm_with_concurrent_resolvers(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    """1,000 atomic replacements while 50 clients resolve: every answer was real, the
    daemon survives, and the final index is exactly what is on disk."""
    sysdir = tree.dir("sysconf")
    gpu = fake_backend(tree.root / "gpu-backend", "gpu", ["virgl"])
    names = [f"{10 + i}-storm.json" for i in range(STORM_FILES)]
    # Alternate each file between a gpu and an input descriptor; 99-stable.json keeps
    # Resolve("gpu") answerable at every instant.
    variants = [
        lambda n, i: doc("gpu", gpu, f"{n} gpu {i % 3}"),
        lambda n, i: doc("input", "/usr/bin/true", f"{n} input"),
    ]
    written: dict[str, set[tuple[str, str, str]]] = {n: set() for n in names}
    for n in names:
        (sysdir / n).write_text(variants[0](n, 0))
        written[n].add(("gpu", gpu, f"{n} gpu 0"))
    tree.write("data", "99-stable.json", descriptor("gpu", gpu, "stable"))
    written["99-stable.json"] = {("gpu", gpu, "stable")}
    d = start_daemon()

    stop = threading.Event()
    writer_error: list[BaseException] = []

    def writer() -> None:
        rng = random.Random(1)
        try:
            for i in range(STORM_RENAMES):
                n = names[i % STORM_FILES]
                text = variants[rng.randrange(2)](n, i)
                content = json.loads(text)
                written[n].add((content["type"], content["binary"], content["description"]))
                write_atomic(sysdir / n, text)
                if i % 10 == 9:
                    time.sleep(0.02)  # pacing: spread the storm over many watcher batches
        except BaseException as e:  # noqa: BLE001 - reported by the test
            writer_error.append(e)
        finally:
            stop.set()

    answers: list[tuple[str, dict[str, Any]]] = []
    failures: list[str] = []

    async def resolver(address: str, k: int) -> None:
        async with await listen(address, rules=()) as c:
            features = ["virgl"] if k % 5 == 0 else []
            while not stop.is_set():
                try:
                    path, answer = await c.call("Resolve", "sas", ["gpu", features])
                except CallFailed as e:
                    failures.append(str(e))
                    continue
                answers.append((path, unwrap(answer)))

    async def main() -> None:
        async with await listen(bus.address) as L:
            g0 = await L.generation()
            t = threading.Thread(target=writer)
            tasks = [asyncio.ensure_future(resolver(bus.address, k)) for k in range(STORM_CLIENTS)]
            t.start()
            try:
                await asyncio.gather(*tasks)
            finally:
                stop.set()
                await asyncio.get_running_loop().run_in_executor(None, t.join)
            assert not writer_error, writer_error
            # The final state, once the daemon has caught up, is exactly the disk's.
            await L.settle(sysdir)
            await L.wait_rows(expected_rows(tree), "the index to equal the disk")
            await L.assert_matches_disk(tree)
            changes = L.index_changed(0)
            assert changes == list(range(g0 + 1, g0 + 1 + len(changes)))
            assert changes and await L.generation() == changes[-1]

    start = time.monotonic()
    run(main(), timeout=120)
    elapsed = time.monotonic() - start

    assert not failures, failures[:5]
    assert len(answers) >= STORM_CLIENTS, len(answers)
    for path, a in answers:
        assert path == a["object"] == descriptor_path(a["name"])
        assert a["type"] == "gpu"
        assert (a["type"], a["binary"], a["description"]) in written[a["name"]], a
        if "features" in a:
            assert a["features"] == ["virgl"]
    assert elapsed < 60, elapsed
    assert d.proc.poll() is None, d.log()
    d.assert_clean_log()


def _tasks(pid: int) -> list[str]:
    return sorted(os.listdir(f"/proc/{pid}/task"))


def test_daemon_watches_with_no_thread_of_its_own(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    """The watcher is an fd on the event loop: the daemon is one thread, before and after
    changes (watchfiles used to add a polling thread of its own)."""
    d = start_daemon()
    pid = d.proc.pid
    assert _tasks(pid) == [str(pid)]

    async def body(L: Listener) -> None:
        g0, m = await L.generation(), L.mark()
        tree.write("sysconf", "40-b.json", descriptor("input"))
        await L.wait_names(["40-b.json"])
        shutil.rmtree(tree.dir("user"))
        await L.settle(tree.dir("sysconf"))
        await L.assert_generation(m, g0, 1)
        assert _tasks(pid) == [str(pid)]

    live(bus, tree, d, body)
