"""The index kept current as the descriptor directories change (docs/contract.md sections 1
and 3: Generation, IndexChanged, Diagnostics), in-process and without a bus.

`vhostuserd.edges.watch.Watcher` over `Feed` and the pure `core.index.Index`, on the daemon's
own search path for a test tree (`busutil.Tree.search_path`), with real file operations and
real inotify on a real asyncio loop. The daemon emits one IndexChanged per effective `Change`
the watcher reports (`bus.manager.Broker.on_change`), so counting effective changes here counts
what a client would see; the bus tests in tests/test_live_index.py and
tests/test_object_manager.py prove that translation. After every step the index equals a fresh
scan of the disk (`helpers_live.expected_rows`), and the generation moved once per change.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from busutil import Tree, await_for, descriptor
from helpers_live import expected_diagnostics, expected_rows, overwrite, row, write_atomic

from vhostuserd.core.descriptors import Descriptor
from vhostuserd.core.index import Change, Index
from vhostuserd.edges.watch import Feed, Watcher

_barriers = itertools.count()


def doc(btype: str = "gpu", binary: str = "/usr/bin/true", description: str = "test") -> str:
    return json.dumps(descriptor(btype, binary, description))


class Watched:
    """A watcher armed over ``tree``'s search path, and every change it reported."""

    def __init__(self, tree: Tree, index: Index, watcher: Watcher) -> None:
        self.tree = tree
        self.index = index
        self.watcher = watcher
        self.changes: list[Change] = []

    def mark(self) -> tuple[int, int]:
        """(changes so far, generation): where the next step's counts start."""
        return len(self.changes), self.index.generation

    def effective_since(self, mark: tuple[int, int]) -> list[Change]:
        return [c for c in self.changes[mark[0] :] if c.effective]

    async def settle(self, directory: Path) -> None:
        """Return once every event in ``directory`` before this call has been applied: a
        broken barrier file is diagnosed, then removed and no longer diagnosed (inotify keeps
        the order of events, so everything earlier was applied by then). The barrier changes
        only diagnostics, never the effective index."""
        path = directory / f"zz-barrier-{next(_barriers)}.json"
        path.write_text("{barrier")
        await await_for(lambda: self._diagnosed(path), f"the barrier diagnostic for {path}")
        path.unlink()
        await await_for(lambda: not self._diagnosed(path), f"the barrier {path} to go")

    def _diagnosed(self, path: Path) -> bool:
        return any(d.path == str(path) for d in self.index.diagnostics)

    async def wait_rows(self, want: Callable[[list[Descriptor]], object], what: str) -> None:
        await await_for(
            lambda: want(list(self.index.descriptors)),
            lambda: f"{what}; the index holds {[row(d) for d in self.index.descriptors]}",
        )

    async def wait_names(self, names: list[str]) -> None:
        await self.wait_rows(lambda ds: [d.name for d in ds] == names, f"the names {names}")

    def assert_changes(self, mark: tuple[int, int], n: int) -> list[Change]:
        """Exactly ``n`` effective changes since ``mark``, and the generation moved by ``n``."""
        got = self.effective_since(mark)
        assert len(got) == n, (n, got)
        assert self.index.generation == mark[1] + n, (self.index.generation, mark, n)
        return got

    async def edit_in_place(self, path: Path, description: str) -> None:
        """Rewrite ``path`` in place with ``description``: exactly one change follows."""
        m = self.mark()
        overwrite(path, doc("gpu", description=description))
        await self.wait_rows(
            lambda ds: any(d.description == description for d in ds), f"the edit {description!r}"
        )
        await self.settle(path.parent)
        self.assert_changes(m, 1)

    def assert_matches_disk(self) -> list[Descriptor]:
        """The index's descriptors and diagnostics equal a fresh scan of the tree."""
        assert [row(d) for d in self.index.descriptors] == expected_rows(self.tree)
        assert [d.as_tuple() for d in self.index.diagnostics] == expected_diagnostics(self.tree)
        return list(self.index.descriptors)


def watching(tree: Tree, body: Callable[[Watched], Awaitable[None]]) -> None:
    """Run ``body`` with a watcher armed over the daemon's search path for ``tree``."""

    async def main() -> None:
        feed = Feed(Index(tree.search_path()))
        feed.rescan()
        watcher = Watcher(feed, lambda change: w.changes.append(change))
        w = Watched(tree, feed.index, watcher)
        stop = asyncio.Event()
        task = asyncio.ensure_future(watcher.run(stop))
        await await_for(lambda: watcher.batches >= 1 or task.done(), "the watcher to arm")
        try:
            await body(w)
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)

    asyncio.run(asyncio.wait_for(main(), 120))


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return Tree.make(tmp_path)


def test_a_file_modified_in_place_is_changed_not_removed_and_added(tree: Tree) -> None:
    path = tree.write("data", "50-a.json", descriptor("gpu", description="before"))

    async def body(w: Watched) -> None:
        m = w.mark()
        overwrite(path, doc("gpu", "/usr/bin/false", "after"))
        await w.wait_rows(lambda ds: ds[0].description == "after", "the new description")
        await w.settle(path.parent)
        (change,) = w.assert_changes(m, 1)
        assert [d.name for d in change.changed] == ["50-a.json"]
        assert change.added == [] and change.removed == []
        (d,) = w.assert_matches_disk()
        assert (d.description, d.binary) == ("after", "/usr/bin/false")

    watching(tree, body)


def test_truncating_a_file_masks_the_name_and_rewriting_it_unmasks(tree: Tree) -> None:
    tree.write("data", "50-a.json", descriptor("gpu", description="data tier"))
    over = tree.write("sysconf", "50-a.json", descriptor("gpu", description="sysconf tier"))

    async def body(w: Watched) -> None:
        assert w.index.descriptors[0].tier == "sysconf"
        m = w.mark()
        os.truncate(over, 0)
        # Rule 3: the empty winner hides the name; the data-tier file does not come back.
        await w.wait_rows(lambda ds: ds == [], "the name to be masked")
        await w.settle(over.parent)
        w.assert_changes(m, 1)
        w.assert_matches_disk()
        assert w.index.diagnostics == ()
        m = w.mark()
        over.write_text(doc("gpu", description="unmasked"))
        await w.wait_rows(lambda ds: len(ds) == 1, "the name to come back")
        await w.settle(over.parent)
        w.assert_changes(m, 1)
        (d,) = w.assert_matches_disk()
        assert (d.tier, d.description) == ("sysconf", "unmasked")

    watching(tree, body)


def test_deleting_the_winner_uncovers_the_less_specific_file_and_then_the_name_goes(
    tree: Tree,
) -> None:
    low = tree.write("data", "50-a.json", descriptor("gpu", description="data tier"))
    high = tree.write("user", "50-a.json", descriptor("gpu", description="user tier"))

    async def body(w: Watched) -> None:
        m = w.mark()
        high.unlink()
        await w.wait_rows(lambda ds: ds and ds[0].tier == "data", "the data tier file")
        await w.settle(high.parent)
        (change,) = w.assert_changes(m, 1)
        assert [d.tier for d in change.changed] == ["data"]
        w.assert_matches_disk()
        m = w.mark()
        low.unlink()
        await w.wait_rows(lambda ds: ds == [], "an empty index")
        await w.settle(low.parent)
        (change,) = w.assert_changes(m, 1)
        assert [d.name for d in change.removed] == ["50-a.json"]
        w.assert_matches_disk()

    watching(tree, body)


def test_an_atomic_rename_gives_exactly_one_change(tree: Tree) -> None:
    path = tree.write("sysconf", "50-a.json", descriptor("gpu", description="v1"))

    async def body(w: Watched) -> None:
        for version, target in enumerate([path, path, path.parent / "60-new.json"], start=2):
            m = w.mark()
            write_atomic(target, doc("gpu", description=f"v{version}"))
            await w.wait_rows(
                lambda ds, v=version: any(d.description == f"v{v}" for d in ds),
                f"description v{version}",
            )
            await w.settle(path.parent)
            w.assert_changes(m, 1)
            w.assert_matches_disk()
        # The temporary dot-files were never candidates.
        assert all(".tmp" not in d.path for d in w.index.descriptors)
        assert w.index.diagnostics == ()

    watching(tree, body)


@pytest.mark.parametrize("missing", ["vhost-user", "qemu", "sysconfdir"])
def test_a_directory_created_after_the_start_is_picked_up_and_stays_watched(
    tree: Tree, missing: str
) -> None:
    sysdir = tree.dir("sysconf")
    gone = {"vhost-user": sysdir, "qemu": sysdir.parent, "sysconfdir": tree.sysconfdir}[missing]
    shutil.rmtree(gone)
    tree.write("data", "50-a.json", descriptor("gpu", description="data tier"))

    async def body(w: Watched) -> None:
        m = w.mark()
        w.assert_matches_disk()
        sysdir.mkdir(parents=True)
        (sysdir / "50-a.json").write_text(doc("gpu", description="sysconf tier"))
        await w.wait_rows(lambda ds: ds and ds[0].tier == "sysconf", "the sysconf file")
        await w.settle(sysdir)
        w.assert_changes(m, 1)
        w.assert_matches_disk()
        m = w.mark()
        (sysdir / "40-b.json").write_text(doc("input"))
        await w.wait_names(["40-b.json", "50-a.json"])
        await w.settle(sysdir)
        w.assert_changes(m, 1)
        w.assert_matches_disk()

    watching(tree, body)


def test_a_directory_deleted_and_recreated_keeps_being_watched(tree: Tree) -> None:
    sysdir = tree.dir("sysconf")
    tree.write("sysconf", "50-a.json", descriptor("gpu", description="first"))
    tree.write("data", "60-b.json", descriptor("input"))

    async def body(w: Watched) -> None:
        for cycle in range(3):
            m = w.mark()
            shutil.rmtree(sysdir)
            await w.wait_names(["60-b.json"])
            await w.settle(tree.dir("data"))
            w.assert_changes(m, 1)
            w.assert_matches_disk()
            m = w.mark()
            sysdir.mkdir()
            (sysdir / "50-a.json").write_text(doc("gpu", description=f"cycle {cycle}"))
            await w.wait_names(["50-a.json", "60-b.json"])
            await w.settle(sysdir)
            w.assert_changes(m, 1)
            assert w.assert_matches_disk()[0].description == f"cycle {cycle}"
            # An in-place change in the recreated directory is seen too.
            await w.edit_in_place(sysdir / "50-a.json", f"cycle {cycle} edited")
        # Deleted and recreated at once (within one batch of events): the directory's path
        # is the same, but its old watch is dead; the new one must be watched.
        for cycle in range(3):
            shutil.rmtree(sysdir)
            sysdir.mkdir()
            (sysdir / "50-a.json").write_text(doc("gpu", description=f"fast {cycle}"))
            await w.wait_rows(
                lambda ds, c=cycle: ds and ds[0].description == f"fast {c}", "the recreated file"
            )
            await w.settle(sysdir)
            w.assert_matches_disk()
            await w.edit_in_place(sysdir / "50-a.json", f"fast {cycle} edited")

    watching(tree, body)


def test_a_retargeted_symlink_is_followed_and_a_dangling_one_shadows_and_is_diagnosed(
    tree: Tree,
) -> None:
    targets = tree.root / "targets"
    targets.mkdir()
    (targets / "gpu.json").write_text(doc("gpu"))
    (targets / "input.json").write_text(doc("input"))
    link = tree.dir("sysconf") / "50-link.json"
    link.symlink_to(targets / "gpu.json")

    def retarget(target: Path) -> None:
        tmp = link.parent / ".50-link.json.new"
        tmp.symlink_to(target)
        tmp.rename(link)

    async def body(w: Watched) -> None:
        (d,) = w.assert_matches_disk()
        assert (d.type, d.path) == ("gpu", str(link))
        m = w.mark()
        retarget(targets / "input.json")
        await w.wait_rows(lambda ds: ds and ds[0].type == "input", "the input target")
        await w.settle(link.parent)
        w.assert_changes(m, 1)
        w.assert_matches_disk()
        # A dangling target shadows and is diagnosed (rule 4).
        m = w.mark()
        retarget(targets / "missing.json")
        await w.wait_rows(lambda ds: ds == [], "the dangling link to yield nothing")
        await w.settle(link.parent)
        w.assert_changes(m, 1)
        w.assert_matches_disk()
        (diag,) = w.index.diagnostics
        assert (diag.path, diag.level) == (str(link), "error") and "dangling" in diag.message
        # Back to a valid target, the non-atomic way (ln -sf: unlink, then symlink).
        link.unlink()
        link.symlink_to(targets / "gpu.json")
        await w.wait_rows(lambda ds: ds and ds[0].type == "gpu", "the gpu target again")
        await w.settle(link.parent)
        w.assert_matches_disk()
        assert w.index.diagnostics == ()

    watching(tree, body)


def test_touching_or_rewriting_a_file_with_the_same_content_changes_nothing(tree: Tree) -> None:
    path = tree.write("sysconf", "50-a.json", descriptor("gpu"))
    data = path.read_bytes()

    async def body(w: Watched) -> None:
        before = w.assert_matches_disk()
        m = w.mark()
        os.utime(path)
        overwrite(path, data)
        write_atomic(path, data)
        await w.settle(path.parent)
        # "never when nothing effective changed": no IndexChanged, the generation stays.
        w.assert_changes(m, 0)
        assert w.assert_matches_disk() == before

    watching(tree, body)


def test_a_burst_of_20_writes_coalesces(tree: Tree) -> None:
    path = tree.write("sysconf", "50-a.json", descriptor("gpu", description="start"))

    async def body(w: Watched) -> None:
        m = w.mark()
        for i in range(20):
            path.write_text(doc("gpu", description=f"write {i:02d}"))
        await w.wait_rows(lambda ds: ds and ds[0].description == "write 19", "the last write")
        await w.settle(path.parent)
        n = len(w.effective_since(m))
        assert 1 <= n < 20, n
        w.assert_changes(m, n)
        w.assert_matches_disk()

    watching(tree, body)


def test_a_directory_moved_away_and_back_is_followed(tree: Tree) -> None:
    """A tier directory renamed away is no longer that tier (its watch follows the inode,
    which is elsewhere now); renamed back, it is watched again."""
    sysdir = tree.dir("sysconf")
    aside = sysdir.parent / "vhost-user.aside"
    tree.write("sysconf", "50-a.json", descriptor("gpu", description="sysconf"))

    async def body(w: Watched) -> None:
        m = w.mark()
        sysdir.rename(aside)
        await w.wait_rows(lambda ds: ds == [], "the moved directory's descriptor to go")
        # Changes in the directory where it is now are not the tier's.
        (aside / "40-b.json").write_text(doc("input"))
        sysdir.mkdir()
        await w.settle(sysdir)
        w.assert_changes(m, 1)
        w.assert_matches_disk()
        m = w.mark()
        sysdir.rmdir()
        aside.rename(sysdir)
        await w.wait_names(["40-b.json", "50-a.json"])
        await w.settle(sysdir)
        w.assert_changes(m, 1)
        await w.edit_in_place(sysdir / "50-a.json", "sysconf, edited")
        w.assert_matches_disk()

    watching(tree, body)
