"""The directory watcher on its own, in-process: `vhostuserd.edges.watch.Watcher` over a real
`Index`, real directories and real inotify, on a real asyncio loop (no bus, no mock).

What the live tests (test_live_index.py) cannot provoke from outside the daemon is proved
here: a kernel queue overflow is answered by a full rescan, a name that is not UTF-8 is
diagnosed (and forgotten) without stopping the watch, and the watcher runs on the event
loop itself: no thread, and nothing scheduled once the events have been applied.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from busutil import await_for

from vhostuserd.core.index import Change, Index
from vhostuserd.core.lookup import Directory
from vhostuserd.edges import inotify
from vhostuserd.edges.watch import Feed, Watcher

DOC = json.dumps({"description": "d", "type": "gpu", "binary": "/usr/bin/true"})


def tiers(root: Path) -> tuple[Directory, ...]:
    dirs = (
        Directory("sysconf", str(root / "etc/qemu/vhost-user")),
        Directory("data", str(root / "share/qemu/vhost-user")),
    )
    for d in dirs:
        os.makedirs(d.path)
    return dirs


def watching(root: Path, body: Callable[[Index, Watcher, list[Change]], Awaitable[None]]) -> None:
    """Run ``body`` with a watcher armed over two tiers under ``root``."""

    async def main() -> None:
        feed = Feed(Index(tiers(root)))
        index = feed.index
        feed.rescan()
        changes: list[Change] = []
        watcher = Watcher(feed, changes.append)
        stop = asyncio.Event()
        task = asyncio.ensure_future(watcher.run(stop))
        await await_for(lambda: watcher.batches >= 1 or task.done(), "the watcher to arm")
        try:
            await body(index, watcher, changes)
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)

    asyncio.run(main())


def names(index: Index) -> list[str]:
    return [d.name for d in index.descriptors]


def test_queue_overflow_is_answered_by_a_full_rescan(tmp_path: Path) -> None:
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 200_000:
        pytest.skip(f"fs.inotify.max_queued_events is {limit}: too many events to overflow it here")
    noise = [tmp_path / "etc/qemu/vhost-user" / f"noise-{k}.txt" for k in range(2)]

    async def body(index: Index, watcher: Watcher, changes: list[Change]) -> None:
        for p in noise:
            p.write_text("x")
        await await_for(lambda: not watcher._timer, "the noise to be applied")
        # The loop is blocked from here to the await: nothing reads the inotify fd, so the
        # kernel queue fills (alternating names: identical consecutive events would merge)
        # and every event after the limit is dropped, the new descriptor's among them.
        for k in range(limit + 64):
            os.utime(noise[k % 2])
        late = tmp_path / "share/qemu/vhost-user/50-late.json"
        late.write_text(DOC)
        assert watcher.overflows == 0
        await await_for(
            lambda: index.get("50-late.json") is not None,
            "the descriptor whose events were dropped to be found by a rescan",
        )
        assert watcher.overflows == 1
        assert names(index) == ["50-late.json"]
        # And the watch goes on after the overflow.
        (tmp_path / "etc/qemu/vhost-user/40-next.json").write_text(DOC)
        await await_for(lambda: names(index) == ["40-next.json", "50-late.json"], "the next file")

    watching(tmp_path, body)


def test_name_that_is_not_utf8_is_diagnosed_then_forgotten_and_the_watch_goes_on(
    tmp_path: Path,
) -> None:
    directory = os.fsencode(tmp_path / "etc/qemu/vhost-user")
    bad = directory + b"/\xff-bad.json"
    shown = os.fsdecode(directory) + "/\\xff-bad.json"

    def diagnosed(index: Index) -> bool:
        return any(
            d.path == shown and d.level == "error" and "UTF-8" in d.message
            for d in index.diagnostics
        )

    async def body(index: Index, watcher: Watcher, changes: list[Change]) -> None:
        Path(os.fsdecode(bad)).write_text(DOC)
        await await_for(lambda: diagnosed(index), "the file to be diagnosed")
        assert names(index) == [] and changes and changes[-1].diagnostics_changed
        os.rename(bad, directory + b"/\xfe-renamed.json")
        await await_for(
            lambda: (
                not diagnosed(index)
                and any("\\xfe-renamed.json" in d.path for d in index.diagnostics)
            ),
            "the diagnostic to follow the rename",
        )
        os.unlink(directory + b"/\xfe-renamed.json")
        await await_for(lambda: index.diagnostics == (), "the diagnostic to go")
        Path(os.fsdecode(directory), "50-good.json").write_text(DOC)
        await await_for(lambda: names(index) == ["50-good.json"], "an ordinary file after them")

    watching(tmp_path, body)


def tasks_of_this_process() -> int:
    return len(os.listdir("/proc/self/task"))


def test_watcher_runs_on_the_loop_with_no_thread_and_nothing_scheduled_when_idle(
    tmp_path: Path,
) -> None:
    threads, tasks = threading.active_count(), tasks_of_this_process()

    async def body(index: Index, watcher: Watcher, changes: list[Change]) -> None:
        loop: Any = asyncio.get_running_loop()

        def scheduled() -> list[Any]:
            # BaseEventLoop keeps every call_later/call_at handle here; the test's own
            # await_for is not sleeping while this runs, so all that is left is the watcher's.
            return [h for h in loop._scheduled if not h.cancelled()]

        assert (threading.active_count(), tasks_of_this_process()) == (threads, tasks)
        assert scheduled() == []
        path = tmp_path / "etc/qemu/vhost-user/50-a.json"
        path.write_text(DOC)
        # While events arrive the coalescing window is scheduled; once applied, nothing is.
        await await_for(lambda: names(index) == ["50-a.json"], "the new file")
        await await_for(lambda: not scheduled(), "the coalescing window to close")
        for _ in range(20):
            path.write_text(DOC.replace('"d"', '"e"'))
        await await_for(lambda: index.get("50-a.json").description == "e", "the burst")  # type: ignore[union-attr]
        await await_for(lambda: not scheduled(), "the coalescing window to close")
        assert (threading.active_count(), tasks_of_this_process()) == (threads, tasks)

    watching(tmp_path, body)


def test_inotify_module_reads_events_with_their_raw_names(tmp_path: Path) -> None:
    with inotify.Inotify() as fd:
        wd = fd.add_watch(tmp_path, inotify.IN_CREATE | inotify.IN_DELETE)
        assert fd.read() == []  # non-blocking
        raw = os.fsencode(tmp_path) + b"/caf\xe9.json"
        open(raw, "w").close()
        os.unlink(raw)
        events = fd.read()
        assert [(e.wd, e.mask, e.name) for e in events] == [
            (wd, inotify.IN_CREATE, b"caf\xe9.json"),
            (wd, inotify.IN_DELETE, b"caf\xe9.json"),
        ]
        fd.rm_watch(wd)
        fd.rm_watch(wd)  # gone already: no error
        assert [e.mask for e in fd.read()] == [inotify.IN_IGNORED]
        with pytest.raises(FileNotFoundError):
            fd.add_watch(tmp_path / "missing", inotify.IN_CREATE)
