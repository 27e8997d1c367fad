"""The running daemon keeps its index current as the descriptor directories change
(docs/contract.md sections 1 and 3: Generation, IndexChanged, ListDescriptors, Diagnostics).

Every test drives the real daemon on a real private bus with real file operations and
real inotify. Signal counts are exact: `Listener.settle` proves that the daemon has
processed every event before the count is taken.
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
from pathlib import Path
from typing import Any

import pytest
from busutil import Daemon, PrivateBus, Tree, await_for, descriptor, fake_backend, run
from helpers_live import (
    DESCRIPTOR_IFACE,
    MANAGER_IFACE,
    PROPS_IFACE,
    CallFailed,
    Listener,
    expected_rows,
    listen,
    overwrite,
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


def test_file_modified_in_place_changes_the_descriptor(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    path = tree.write("data", "50-a.json", descriptor("gpu", description="before"))
    d = start_daemon()

    async def body(L: Listener) -> None:
        g0, m = await L.generation(), L.mark()
        overwrite(path, doc("gpu", "/usr/bin/false", "after"))
        await L.wait_rows(lambda rows: rows[0][4] == "after", "the new description")
        await L.settle(path.parent)
        await L.assert_generation(m, g0, 1)
        items = await L.assert_matches_disk(tree)
        assert (items[0]["description"], items[0]["binary"]) == ("after", "/usr/bin/false")
        # Same name, same object: changed in place, not removed and added.
        assert not L.since(m, "InterfacesAdded") and not L.since(m, "InterfacesRemoved")
        obj = descriptor_path("50-a.json")
        assert await L.prop("Description", obj, DESCRIPTOR_IFACE) == "after"

    live(bus, tree, d, body)


def test_truncating_a_file_masks_the_name_and_rewriting_it_unmasks(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    tree.write("data", "50-a.json", descriptor("gpu", description="data tier"))
    over = tree.write("sysconf", "50-a.json", descriptor("gpu", description="sysconf tier"))
    d = start_daemon()

    async def body(L: Listener) -> None:
        g0, m = await L.generation(), L.mark()
        assert (await L.descriptors())[0]["tier"] == "sysconf"
        os.truncate(over, 0)
        # Rule 3: the empty winner hides the name; the data-tier file does not come back.
        await L.wait_rows([], "the name to be masked")
        await L.settle(over.parent)
        await L.assert_generation(m, g0, 1)
        await L.assert_matches_disk(tree)
        assert await L.diagnostics() == []
        m1 = L.mark()
        over.write_text(doc("gpu", description="unmasked"))
        await L.wait_rows(lambda rows: len(rows) == 1, "the name to come back")
        await L.settle(over.parent)
        await L.assert_generation(m1, g0 + 1, 1)
        items = await L.assert_matches_disk(tree)
        assert (items[0]["tier"], items[0]["description"]) == ("sysconf", "unmasked")

    live(bus, tree, d, body)


def test_deleting_the_winner_uncovers_the_less_specific_file_and_then_the_name_goes(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    low = tree.write("data", "50-a.json", descriptor("gpu", description="data tier"))
    high = tree.write("user", "50-a.json", descriptor("gpu", description="user tier"))
    d = start_daemon()

    async def body(L: Listener) -> None:
        g0, m = await L.generation(), L.mark()
        high.unlink()
        await L.wait_rows(lambda rows: rows and rows[0][2] == "data", "the data tier file")
        await L.settle(high.parent)
        await L.assert_generation(m, g0, 1)
        await L.assert_matches_disk(tree)
        m1 = L.mark()
        low.unlink()
        await L.wait_rows([], "an empty index")
        await L.settle(low.parent)
        await L.assert_generation(m1, g0 + 1, 1)
        await L.assert_matches_disk(tree)
        assert len(L.since(m1, "InterfacesRemoved")) == 1

    live(bus, tree, d, body)


def test_atomic_rename_gives_exactly_one_index_changed(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    path = tree.write("sysconf", "50-a.json", descriptor("gpu", description="v1"))
    d = start_daemon()

    async def body(L: Listener) -> None:
        for version, target in enumerate([path, path, path.parent / "60-new.json"], start=2):
            g0, m = await L.generation(), L.mark()
            write_atomic(target, doc("gpu", description=f"v{version}"))
            await L.wait_rows(
                lambda rows, v=version: any(r[4] == f"v{v}" for r in rows),
                f"description v{version}",
            )
            await L.settle(path.parent)
            await L.assert_generation(m, g0, 1)
            await L.assert_matches_disk(tree)
        # The temporary dot-files were never candidates.
        assert all(".tmp" not in r[1] for r in await L.rows())
        assert await L.diagnostics() == []

    live(bus, tree, d, body)


@pytest.mark.parametrize("missing", ["vhost-user", "qemu", "sysconfdir"])
def test_directory_created_after_start_is_picked_up(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon, missing: str
) -> None:
    sysdir = tree.dir("sysconf")
    gone = {"vhost-user": sysdir, "qemu": sysdir.parent, "sysconfdir": tree.sysconfdir}[missing]
    shutil.rmtree(gone)
    tree.write("data", "50-a.json", descriptor("gpu", description="data tier"))
    d = start_daemon()

    async def body(L: Listener) -> None:
        g0, m = await L.generation(), L.mark()
        await L.assert_matches_disk(tree)
        sysdir.mkdir(parents=True)
        (sysdir / "50-a.json").write_text(doc("gpu", description="sysconf tier"))
        await L.wait_rows(lambda rows: rows and rows[0][2] == "sysconf", "the sysconf file")
        await L.settle(sysdir)
        await L.assert_generation(m, g0, 1)
        await L.assert_matches_disk(tree)
        # And the new directory stays watched.
        m1 = L.mark()
        (sysdir / "40-b.json").write_text(doc("input"))
        await L.wait_names(["40-b.json", "50-a.json"])
        await L.settle(sysdir)
        await L.assert_generation(m1, g0 + 1, 1)
        await L.assert_matches_disk(tree)

    live(bus, tree, d, body)


def test_directory_deleted_and_recreated_keeps_being_watched(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    sysdir = tree.dir("sysconf")
    tree.write("sysconf", "50-a.json", descriptor("gpu", description="first"))
    tree.write("data", "60-b.json", descriptor("input"))
    d = start_daemon()

    async def body(L: Listener) -> None:
        for cycle in range(3):
            g0, m = await L.generation(), L.mark()
            shutil.rmtree(sysdir)
            await L.wait_names(["60-b.json"])
            await L.settle(tree.dir("data"))
            await L.assert_generation(m, g0, 1)
            await L.assert_matches_disk(tree)
            m1 = L.mark()
            sysdir.mkdir()
            (sysdir / "50-a.json").write_text(doc("gpu", description=f"cycle {cycle}"))
            await L.wait_names(["50-a.json", "60-b.json"])
            await L.settle(sysdir)
            await L.assert_generation(m1, g0 + 1, 1)
            items = await L.assert_matches_disk(tree)
            assert items[0]["description"] == f"cycle {cycle}"
            # An in-place change in the recreated directory is seen too.
            m2 = L.mark()
            overwrite(sysdir / "50-a.json", doc("gpu", description=f"cycle {cycle} edited"))
            await L.wait_rows(lambda rows, c=cycle: rows[0][4] == f"cycle {c} edited", "the edit")
            await L.settle(sysdir)
            await L.assert_generation(m2, g0 + 2, 1)
        # Deleted and recreated at once (within one batch of events): the directory's
        # path is the same, but its old watch is dead; the new one must be watched.
        for cycle in range(3):
            shutil.rmtree(sysdir)
            sysdir.mkdir()
            (sysdir / "50-a.json").write_text(doc("gpu", description=f"fast {cycle}"))
            await L.wait_rows(lambda rows, c=cycle: rows[0][4] == f"fast {c}", "the recreated file")
            await L.settle(sysdir)
            await L.assert_matches_disk(tree)
            g0, m = await L.generation(), L.mark()
            overwrite(sysdir / "50-a.json", doc("gpu", description=f"fast {cycle} edited"))
            await L.wait_rows(lambda rows, c=cycle: rows[0][4] == f"fast {c} edited", "the edit")
            await L.settle(sysdir)
            await L.assert_generation(m, g0, 1)

    live(bus, tree, d, body)


def test_symlink_retargeted(bus: PrivateBus, tree: Tree, start_daemon: StartDaemon) -> None:
    targets = tree.root / "targets"
    targets.mkdir()
    (targets / "gpu.json").write_text(doc("gpu"))
    (targets / "input.json").write_text(doc("input"))
    link = tree.dir("sysconf") / "50-link.json"
    link.symlink_to(targets / "gpu.json")
    d = start_daemon()

    def retarget(target: Path) -> None:
        tmp = link.parent / ".50-link.json.new"
        tmp.symlink_to(target)
        tmp.rename(link)

    async def body(L: Listener) -> None:
        items = await L.assert_matches_disk(tree)
        assert (items[0]["type"], items[0]["path"]) == ("gpu", str(link))
        g0, m = await L.generation(), L.mark()
        retarget(targets / "input.json")
        await L.wait_rows(lambda rows: rows and rows[0][3] == "input", "the input target")
        await L.settle(link.parent)
        await L.assert_generation(m, g0, 1)
        await L.assert_matches_disk(tree)
        # A dangling target shadows and is diagnosed (rule 4).
        m1 = L.mark()
        retarget(targets / "missing.json")
        await L.wait_rows([], "the dangling link to yield nothing")
        await L.settle(link.parent)
        await L.assert_generation(m1, g0 + 1, 1)
        await L.assert_matches_disk(tree)
        (diag,) = await L.diagnostics()
        assert diag[:2] == (str(link), "error") and "dangling" in diag[2]
        # Back to a valid target, the non-atomic way (ln -sf: unlink, then symlink).
        link.unlink()
        link.symlink_to(targets / "gpu.json")
        await L.wait_rows(lambda rows: rows and rows[0][3] == "gpu", "the gpu target again")
        await L.settle(link.parent)
        await L.assert_matches_disk(tree)
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


def test_touching_a_file_without_changing_it_signals_nothing(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    path = tree.write("sysconf", "50-a.json", descriptor("gpu"))
    data = path.read_bytes()
    d = start_daemon()

    async def body(L: Listener) -> None:
        await L.wait_probed()  # its signal is not what this test is about
        g0 = await L.generation()
        before = await L.assert_matches_disk(tree)
        m = L.mark()
        os.utime(path)
        overwrite(path, data)
        write_atomic(path, data)
        await L.settle(path.parent)
        # "never when nothing effective changed": no IndexChanged, no object signal.
        assert L.index_changed(m) == []
        assert await L.generation() == g0
        assert not [
            s
            for s in L.since(m)
            if s.path != "/org/vhostuserd/Broker1"
            or s.member != "PropertiesChanged"
            or "Diagnostics" not in s.body[1]
        ], [(s.path, s.member, s.body) for s in L.since(m)]
        assert await L.assert_matches_disk(tree) == before

    live(bus, tree, d, body)


def test_burst_of_20_writes_coalesces(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    path = tree.write("sysconf", "50-a.json", descriptor("gpu", description="start"))
    d = start_daemon()

    async def body(L: Listener) -> None:
        g0, m = await L.generation(), L.mark()
        for i in range(20):
            path.write_text(doc("gpu", description=f"write {i:02d}"))
        await L.wait_rows(lambda rows: rows and rows[0][4] == "write 19", "the last write")
        await L.settle(path.parent)
        changes = L.index_changed(m)
        assert 1 <= len(changes) < 20, changes
        await L.assert_generation(m, g0, len(changes))
        await L.assert_matches_disk(tree)

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


def test_directory_moved_away_and_back_is_followed(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    """A tier directory renamed away is no longer that tier (its watch follows the inode,
    which is elsewhere now); renamed back, it is watched again."""
    sysdir = tree.dir("sysconf")
    aside = sysdir.parent / "vhost-user.aside"
    tree.write("sysconf", "50-a.json", descriptor("gpu", description="sysconf"))
    d = start_daemon()

    async def body(L: Listener) -> None:
        g0, m = await L.generation(), L.mark()
        sysdir.rename(aside)
        await L.wait_rows([], "the moved directory's descriptor to go")
        # Changes in the directory where it is now are not the tier's.
        (aside / "40-b.json").write_text(doc("input"))
        sysdir.mkdir()
        await L.settle(sysdir)
        await L.assert_generation(m, g0, 1)
        await L.assert_matches_disk(tree)
        m1 = L.mark()
        sysdir.rmdir()
        aside.rename(sysdir)
        await L.wait_names(["40-b.json", "50-a.json"])
        await L.settle(sysdir)
        await L.assert_generation(m1, g0 + 1, 1)
        m2 = L.mark()
        overwrite(sysdir / "50-a.json", doc("gpu", description="sysconf, edited"))
        await L.wait_rows(lambda rows: rows[1][4] == "sysconf, edited", "the edit")
        await L.settle(sysdir)
        await L.assert_generation(m2, g0 + 2, 1)
        await L.assert_matches_disk(tree)

    live(bus, tree, d, body)


def test_name_that_is_not_utf8_is_diagnosed_live_and_the_watch_goes_on(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    directory = os.fsencode(tree.dir("sysconf"))
    bad = directory + b"/\xff-late.json"
    shown = str(tree.dir("sysconf")) + "/\\xff-late.json"
    tree.write("data", "50-a.json", descriptor("gpu"))
    d = start_daemon()

    async def body(L: Listener) -> None:
        Path(os.fsdecode(bad)).write_text(doc("gpu"))
        await await_for(lambda: L.diagnostics(), "a diagnostic")
        (diag,) = await L.diagnostics()
        assert diag[:2] == (shown, "error") and "UTF-8" in diag[2], diag
        assert [r[0] for r in await L.rows()] == ["50-a.json"]
        os.unlink(bad)
        await await_for(lambda: _no_diagnostics(L), "the diagnostic to go")
        g0, m = await L.generation(), L.mark()
        tree.write("sysconf", "40-b.json", descriptor("input"))
        await L.wait_names(["40-b.json", "50-a.json"])
        await L.settle(tree.dir("sysconf"))
        await L.assert_generation(m, g0, 1)
        await L.assert_matches_disk(tree)

    live(bus, tree, d, body)


async def _no_diagnostics(L: Listener) -> bool:
    return await L.diagnostics() == []


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
