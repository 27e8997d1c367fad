"""The index's edge: reading what it is fed, and the watcher that says when to read.

`Feed` re-reads whole tier directories (through a `scan.FileCache`: unchanged files are not
re-read) or single candidate files, and hands what it read to the pure `core.index.Index`; it
also keeps which candidates are symlinks, whose targets may change without an event. The
`Watcher` watches exactly the tier directories, non-recursively, or the nearest existing
ancestor of one that is missing, re-armed when directories appear or disappear.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Callable, Iterable

from vhostuserd.core.index import Change, Index, sendable
from vhostuserd.edges import inotify, scan

log = logging.getLogger("vhostuserd.index")

# The watcher applies events once COALESCE_S passed without a new one, and at most
# MAX_DELAY_S after the first of a batch. A save is a few events within microseconds, so
# 1 ms gathers them into one update; the bound keeps a storm from delaying its first
# signal. When every candidate file with events is complete (closed after writing, renamed
# into place, deleted) and no directory changed, there is nothing to wait for: the events
# read so far are applied at once. The window exists only while events arrive: idle,
# nothing is scheduled and nothing wakes the daemon.
COALESCE_S = 0.001
MAX_DELAY_S = 0.010

_FILE_EVENTS = (
    inotify.IN_CREATE
    | inotify.IN_DELETE
    | inotify.IN_MOVED_FROM
    | inotify.IN_MOVED_TO
    | inotify.IN_MODIFY
    | inotify.IN_CLOSE_WRITE
    | inotify.IN_ATTRIB
)
_SELF_EVENTS = inotify.IN_DELETE_SELF | inotify.IN_MOVE_SELF  # (IN_IGNORED, IN_UNMOUNT: always)
# A tier directory: its entries and itself. IN_EXCL_UNLINK: a file unlinked but still open
# somewhere is gone for us. An ancestor of a missing one: a new entry, or itself going.
DIR_MASK = _FILE_EVENTS | _SELF_EVENTS | inotify.IN_ONLYDIR | inotify.IN_EXCL_UNLINK
ANCESTOR_MASK = inotify.IN_CREATE | inotify.IN_MOVED_TO | _SELF_EVENTS | inotify.IN_ONLYDIR


class Feed:
    """What ``index`` is fed with, read from the file system."""

    def __init__(self, index: Index) -> None:
        self.index = index
        self.cache = scan.FileCache()
        # Candidates that are symlinks, kept as files come and go, so a change does not
        # cost an lstat of every descriptor (see symlinked_paths).
        self._symlinks: set[str] = set()

    def rescan(self, which: Iterable[int] | None = None) -> Change:
        """Re-list whole directories (all by default); unchanged files are not re-read."""
        dirs = self.index.dirs
        tiers = range(len(dirs)) if which is None else which
        change = self.index.replace_tiers(
            {i: scan.list_directory(dirs[i], self.cache) for i in tiers}
        )
        live = self.index.live_paths()
        self.cache.forget_missing(live)
        self._symlinks = {path for path in live if os.path.islink(path)}
        return change

    def update_files(self, paths: Iterable[str]) -> Change:
        """Re-read just these candidate paths (created, modified, deleted or renamed)."""
        updates = []
        for path in paths:
            directory, name = os.path.split(path)
            i = self.index.tier_of.get(directory)
            if i is None or not scan.is_candidate_name(name) or not sendable(path):
                continue  # (a name D-Bus cannot carry is diagnosed by the next rescan)
            parsed = self.cache.get(path, name, self.index.dirs[i].tier)
            if parsed is None:
                self.cache.entries.pop(path, None)
            if parsed is not None and os.path.islink(path):
                self._symlinks.add(path)
            else:
                self._symlinks.discard(path)
            updates.append((i, name, parsed))
        return self.index.update_entries(updates)

    def symlinked_paths(self) -> list[str]:
        """Candidates that are symlinks: their targets may change without an event here."""
        return sorted(self._symlinks)


def _nearest_existing(path: str) -> str:
    while path != "/" and not os.path.isdir(path):
        path = os.path.dirname(path)
    return path


def _next_component(root: str, path: str) -> str:
    """The first component of ``path`` below its existing ancestor ``root``."""
    return path[len(root) :].lstrip("/").split("/", 1)[0]


class Watcher:
    """Feeds file-system events for the index's directories into ``on_change``.

    One inotify fd, read by the event loop (``add_reader``): no thread, and nothing
    scheduled while nothing happens. Each tier directory is watched for its files; one
    that is missing is waited for at its nearest existing ancestor (for the creation of
    the next component of its path). A watched directory that goes (deleted, moved,
    unmounted) or a waited-for component that appears re-arms the watches, and each tier
    whose watched directory changed is re-listed whole; a queue overflow re-lists every
    tier. Events are applied COALESCE_S after the last one, at most MAX_DELAY_S after
    the first, or at once when each candidate with events is complete.
    """

    def __init__(self, feed: Feed, on_change: Callable[[Change], None]) -> None:
        self.feed = feed
        self.index = index = feed.index
        self.on_change = on_change
        self.batches = 0  # event batches applied
        self.overflows = 0  # IN_Q_OVERFLOW seen (each answered by a full rescan)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inotify: inotify.Inotify | None = None
        self._watches: dict[int, list[str]] = {}  # wd -> the paths it stands for
        self._waiting: dict[str, set[str]] = {}  # ancestor -> names of missing components
        self._armed: list[tuple[str, int]] = [("", -1)] * len(index.dirs)  # (root, wd) per tier
        self._paths: set[str] = set()  # paths in tier directories that had events
        self._touched: set[int] = set()  # tiers where candidates among them had events
        self._writing: set[str] = set()  # candidates last created or modified, not yet closed
        self._tiers: set[int] = set()  # tiers to re-list whole
        self._fresh: set[int] = set()  # among them, those whose directory just appeared
        self._rearm = False
        self._timer: asyncio.TimerHandle | None = None
        self._first = self._last = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        loop = self._loop = asyncio.get_running_loop()
        with inotify.Inotify() as fd:
            self._inotify = fd
            loop.add_reader(fd.fileno(), self._readable)
            try:
                # Anything that happened before the watches existed: re-list whole tiers.
                self._tiers |= self._arm()
                self._apply_pending()  # (at once: no event is pending yet)
                await stop.wait()
            finally:
                loop.remove_reader(fd.fileno())
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
                self._inotify = None
                self._watches.clear()

    # ---- the watches

    def _arm(self) -> set[int]:
        """(Re)place the watches for the directories as they are now; returns the tiers whose
        watched directory changed (their events may have been missed)."""
        assert self._inotify is not None
        watches: dict[int, list[str]] = {}
        added: set[int] = set()  # by every attempt, the last one's included
        for _attempt in range(16):
            masks: dict[str, int] = {}
            waiting: dict[str, set[str]] = {}
            roots: list[str] = []
            for d in self.index.dirs:
                root = _nearest_existing(d.path)
                roots.append(root)
                if root == d.path:
                    masks[root] = masks.get(root, 0) | DIR_MASK
                else:
                    masks[root] = masks.get(root, 0) | ANCESTOR_MASK
                    waiting.setdefault(root, set()).add(_next_component(root, d.path))
            watches = {}
            wd_of: dict[str, int] = {}
            raced = False
            for path, mask in masks.items():
                try:
                    wd = self._inotify.add_watch(path, mask | inotify.IN_MASK_ADD)
                except OSError as e:
                    if e.errno in (errno.ENOENT, errno.ENOTDIR):
                        raced = True  # it went meanwhile: look again
                        break
                    log.warning(
                        "cannot watch %s: %s; its changes are seen at the next re-arm only",
                        path,
                        e.strerror,
                    )
                    continue
                added.add(wd)
                watches.setdefault(wd, []).append(path)
                wd_of[path] = wd
            # A component created between the look and its ancestor's watch gave no event
            # there: look again now that the watches exist.
            if not raced and [_nearest_existing(d.path) for d in self.index.dirs] == roots:
                break
        for wd in (self._watches.keys() | added) - watches.keys():
            self._inotify.rm_watch(wd)
        self._watches, self._waiting = watches, waiting
        armed = [(root, wd_of.get(root, -1)) for root in roots]
        changed = {
            i for i, (old, new) in enumerate(zip(self._armed, armed, strict=True)) if old != new
        }
        self._armed = list(armed)
        log.debug("watching %s", " ".join(sorted(masks)))
        return changed

    # ---- events

    def _readable(self) -> None:
        assert self._inotify is not None
        events = self._inotify.read()
        if not events:
            return
        dir_of = self.index.tier_of
        for e in events:
            if e.mask & inotify.IN_Q_OVERFLOW:
                # The kernel dropped events: nothing known can be trusted; list everything.
                self.overflows += 1
                log.info("inotify queue overflow: rescanning every directory")
                self._tiers.update(range(len(self.index.dirs)))
                self._rearm = True
                continue
            paths = self._watches.get(e.wd)
            if paths is None:
                continue  # a watch already replaced (its IN_IGNORED, say)
            if e.mask & (
                inotify.IN_IGNORED
                | inotify.IN_DELETE_SELF
                | inotify.IN_MOVE_SELF
                | inotify.IN_UNMOUNT
            ):
                self._rearm = True  # the watched directory itself went
                continue
            if not e.name:
                if e.mask & inotify.IN_ATTRIB:  # the directory's own mode: re-list it
                    self._tiers.update(dir_of[p] for p in paths if p in dir_of)
                continue
            name = os.fsdecode(e.name)
            candidate = scan.is_candidate_name(name)
            for p in paths:
                i = dir_of.get(p)
                if i is not None:
                    if not sendable(name):
                        if candidate:
                            self._tiers.add(
                                i
                            )  # update_files cannot carry it; a listing diagnoses it
                        continue
                    path = f"{p}/{name}"
                    self._paths.add(path)
                    if candidate:
                        self._touched.add(i)
                        if (
                            e.mask & (inotify.IN_CREATE | inotify.IN_MODIFY)
                            and not e.mask & inotify.IN_ISDIR
                        ):
                            self._writing.add(path)
                        elif not e.mask & inotify.IN_ATTRIB:
                            self._writing.discard(path)  # closed, renamed or deleted
                if name in self._waiting.get(p, ()):
                    self._rearm = True  # a missing component of a tier's path appeared
        if self._rearm:
            # At once, not after the window: the sooner the new watches exist, the fewer
            # events are only found by listing.
            self._rearm_now()
        self._schedule()

    def _rearm_now(self) -> None:
        self._rearm = False
        changed = self._arm()
        self._tiers |= changed
        # A tier directory that just appeared may be being filled (its files' first events
        # came before its watch): it is listed once that is quiet too, a window later, as
        # for any event, rather than catch a file half written.
        fresh = {i for i in changed if self._armed[i][0] == self.index.dirs[i].path}
        self._fresh |= fresh
        self._touched -= fresh  # (events in the directory it replaced say nothing about it)
        log.debug("watched directories changed; re-armed")

    def _complete(self) -> bool:
        """Whether what is pending can be applied without waiting for more."""
        # A directory that just appeared may hold files written before its watch existed:
        # wait for quiet there, unless events for its candidates came since, all complete.
        return (
            bool(self._touched or self._tiers)
            and not self._writing
            and not self._rearm
            and self._fresh <= self._touched
        )

    def _schedule(self) -> None:
        assert self._loop is not None
        now = self._last = self._loop.time()
        complete = self._complete()
        if self._timer is None:
            self._first = now
        elif complete:
            self._timer.cancel()
        else:
            return  # _due waits for the quiet
        self._timer = self._loop.call_at(now if complete else now + COALESCE_S, self._due)

    def _due(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        quiet_at = self._last + (0.0 if self._complete() else COALESCE_S)
        deadline = self._first + MAX_DELAY_S
        if now < quiet_at and now < deadline:  # events still arriving: wait for a pause
            self._timer = self._loop.call_at(min(quiet_at, deadline), self._due)
            return
        self._timer = None
        try:
            self._apply_pending()
        except Exception:  # a failed batch must not stop the watching
            log.exception("applying directory changes failed; rescanning at the next event")
            self._tiers.update(range(len(self.index.dirs)))
            self._rearm = True

    def _apply_pending(self) -> None:
        if self._rearm:  # (after a failed batch)
            self._rearm_now()
            if self._fresh:
                self._schedule()
                return
        self.batches += 1
        tiers, self._tiers = self._tiers, set()
        paths, self._paths = self._paths, set()
        self._touched.clear()
        self._writing.clear()
        self._fresh.clear()
        if tiers:
            self._apply(self.feed.rescan(sorted(tiers)))
        # Symlinked candidates: their targets may have changed without an event here.
        paths.update(self.feed.symlinked_paths())
        dir_of = self.index.tier_of
        paths = {p for p in paths if dir_of.get(os.path.dirname(p)) not in tiers}
        if paths:
            self._apply(self.feed.update_files(paths))

    def _apply(self, change: Change) -> None:
        if change.effective or change.diagnostics_changed:
            self.on_change(change)
