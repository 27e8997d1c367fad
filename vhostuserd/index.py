"""The live index: the effective descriptor list kept current as the directories change.

Owns the incremental form of the tier merge (a change to one file re-reads that file and
re-decides that one name, so its cost does not grow with the number of descriptors),
the generation counter, and the watcher that feeds it: exactly the tier directories,
non-recursively, or the nearest existing ancestor of one that is missing, re-armed when
directories appear or disappear. The full merge in `lookup` stays the reference: after
any sequence of changes the index equals ``lookup.merge`` of a fresh scan, but for names
that are not UTF-8, which D-Bus cannot carry: the index diagnoses those instead.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import scan
from .descriptors import ERROR, Descriptor, Diagnostic, Parsed
from .lookup import Directory, Listing, sort_key

if TYPE_CHECKING:
    from watchfiles.main import FileChange

log = logging.getLogger("vhostuserd.index")

# watchfiles groups events until STEP_MS of quiet (or DEBOUNCE_MS at most); its thread
# also wakes every STEP_MS to check for stop. 10 ms keeps change->signal latency well
# under 50 ms at about 100 wake-ups a second.
STEP_MS = 10
DEBOUNCE_MS = 200


@dataclass
class Change:
    """What one update did to the effective index."""

    added: list[Descriptor] = field(default_factory=list)
    removed: list[Descriptor] = field(default_factory=list)
    changed: list[Descriptor] = field(default_factory=list)
    diagnostics_changed: bool = False

    @property
    def effective(self) -> bool:
        return bool(self.added or self.removed or self.changed)


class Index:
    """The effective index over ``dirs`` (most specific first)."""

    def __init__(self, dirs: Sequence[Directory]) -> None:
        self.dirs = tuple(dirs)
        self.generation = 0
        self.cache = scan.FileCache()
        self._entries: list[dict[str, Parsed]] = [{} for _ in self.dirs]
        self._dir_diags: list[tuple[Diagnostic, ...]] = [() for _ in self.dirs]
        self._winners: dict[str, Parsed] = {}
        self._descriptors: dict[str, Descriptor] = {}
        self._order: list[bytes] = []  # sort keys of effective names, kept sorted
        self._sorted: tuple[Descriptor, ...] | None = ()
        self._diagnostics: tuple[Diagnostic, ...] | None = ()
        self._dir_of = {d.path: i for i, d in enumerate(self.dirs)}
        # Candidates that are symlinks, kept as files come and go, so a change does not
        # cost an lstat of every descriptor (see symlinked_paths).
        self._symlinks: set[str] = set()

    # ---- reading

    @property
    def descriptors(self) -> tuple[Descriptor, ...]:
        if self._sorted is None:
            self._sorted = tuple(
                self._descriptors[k.decode("utf-8", "surrogateescape")] for k in self._order
            )
        return self._sorted

    def get(self, name: str) -> Descriptor | None:
        return self._descriptors.get(name)

    @property
    def diagnostics(self) -> tuple[Diagnostic, ...]:
        if self._diagnostics is None:
            diags: list[Diagnostic] = [d for ds in self._dir_diags for d in ds]
            for name in sorted(self._winners, key=sort_key):
                diags.extend(self._winners[name].diagnostics)
            self._diagnostics = tuple(diags)
        return self._diagnostics

    # ---- updating

    def _decide(self, name: str, change: Change) -> None:
        """Re-decide one basename across the tiers (rules 2-4) and record the difference."""
        winner = next((e[name] for e in self._entries if name in e), None)
        old_winner = self._winners.get(name)
        if winner is None:
            self._winners.pop(name, None)
        else:
            self._winners[name] = winner
        if (old_winner.diagnostics if old_winner else ()) != (winner.diagnostics if winner else ()):
            change.diagnostics_changed = True
        old = self._descriptors.get(name)
        new = winner.descriptor if winner is not None else None
        if old == new:
            return
        key = sort_key(name)
        if old is None and new is not None:
            bisect.insort(self._order, key)
            self._descriptors[name] = new
            change.added.append(new)
        elif new is None and old is not None:
            del self._order[bisect.bisect_left(self._order, key)]
            del self._descriptors[name]
            change.removed.append(old)
        elif new is not None:
            self._descriptors[name] = new
            change.changed.append(new)
        self._sorted = None

    def _finish(self, change: Change) -> Change:
        if change.diagnostics_changed:
            self._diagnostics = None
        if change.effective:
            self.generation += 1
        return change

    def rescan(self, which: Iterable[int] | None = None) -> Change:
        """Re-list whole directories (all by default); unchanged files are not re-read."""
        change = Change()
        names: set[str] = set()
        for i in range(len(self.dirs)) if which is None else which:
            entries, diagnostics = _sendable_listing(scan.list_directory(self.dirs[i], self.cache))
            names.update(self._entries[i])
            names.update(entries)
            self._entries[i] = entries
            if diagnostics != self._dir_diags[i]:
                self._dir_diags[i] = diagnostics
                change.diagnostics_changed = True
        for name in names:
            self._decide(name, change)
        live = {f"{d.path}/{n}" for d, e in zip(self.dirs, self._entries, strict=True) for n in e}
        self.cache.forget_missing(live)
        self._symlinks = {path for path in live if os.path.islink(path)}
        return self._finish(change)

    def update_files(self, paths: Iterable[str]) -> Change:
        """Re-read just these candidate paths (created, modified, deleted or renamed)."""
        change = Change()
        names: set[str] = set()
        for path in paths:
            directory, name = os.path.split(path)
            i = self._dir_of.get(directory)
            if i is None or not scan.is_candidate_name(name) or not _sendable(path):
                continue  # (a name D-Bus cannot carry is diagnosed by the next rescan)
            parsed = self.cache.get(path, name, self.dirs[i].tier)
            if parsed is None:
                self._entries[i].pop(name, None)
                self.cache.entries.pop(path, None)
            else:
                self._entries[i][name] = parsed
            if parsed is not None and os.path.islink(path):
                self._symlinks.add(path)
            else:
                self._symlinks.discard(path)
            names.add(name)
        for name in names:
            self._decide(name, change)
        return self._finish(change)

    def symlinked_paths(self) -> list[str]:
        """Candidates that are symlinks: their targets may change without an event here."""
        return sorted(self._symlinks)


def _sendable(text: str) -> bool:
    """Whether D-Bus can carry ``text``: its strings are UTF-8. os.listdir keeps bytes that
    are not as lone surrogates, which the daemon could neither list nor export."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(text: str) -> str:
    if _sendable(text):
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _sendable_listing(listing: Listing) -> tuple[dict[str, Parsed], tuple[Diagnostic, ...]]:
    """A directory's entries and diagnostics as the daemon can serve them: a candidate whose
    path is not UTF-8 is left out with an error instead (lookup itself, which sorts such
    names by their bytes, keeps them: this is the one way the index differs from it)."""
    entries: dict[str, Parsed] = {}
    diagnostics = [Diagnostic(_printable(d.path), d.level, _printable(d.message))
                   for d in listing.diagnostics]
    for name, parsed in listing.entries.items():
        path = f"{listing.directory.path}/{name}"
        if _sendable(path):
            entries[name] = parsed
        else:
            diagnostics.append(Diagnostic(_printable(path), ERROR, "file name is not valid "
                                          "UTF-8, which D-Bus cannot carry; ignored"))
    return entries, tuple(diagnostics)


def _nearest_existing(path: str) -> str:
    while path != "/" and not os.path.isdir(path):
        path = os.path.dirname(path)
    return path


class Watcher:
    """Feeds file-system events for the index's directories into ``on_change``."""

    def __init__(self, index: Index, on_change: Callable[[Change], None]) -> None:
        self.index = index
        self.on_change = on_change
        self.batches = 0

    def _roots(self) -> frozenset[str]:
        return frozenset(_nearest_existing(d.path) for d in self.index.dirs)

    def _apply(self, change: Change) -> None:
        if change.effective or change.diagnostics_changed:
            self.on_change(change)

    async def run(self, stop: asyncio.Event) -> None:
        from watchfiles import awatch

        while not stop.is_set():
            roots = self._roots()
            arm_stop = asyncio.Event()
            watch = awatch(
                *sorted(roots),
                recursive=False,
                debounce=DEBOUNCE_MS,
                step=STEP_MS,
                stop_event=arm_stop,
                watch_filter=None,
            )
            stopper = asyncio.ensure_future(stop.wait())
            nxt: asyncio.Future[set[FileChange]] = asyncio.ensure_future(watch.__anext__())
            try:
                await asyncio.sleep(0)  # the watcher's inotify watches now exist
                log.debug("watching %s", " ".join(sorted(roots)))
                # Anything that happened before they existed: resync whole directories.
                self._apply(self.index.rescan())
                rearm = self._roots() != roots
                while not rearm and not stop.is_set():
                    either: set[asyncio.Future[Any]] = {nxt, stopper}
                    done, _ = await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                    if nxt not in done:
                        break
                    try:
                        changes = nxt.result()
                    except StopAsyncIteration:
                        rearm = True
                        break
                    except FileNotFoundError:
                        rearm = True
                        break
                    except Exception as e:  # noqa: BLE001 - the watch is broken, the daemon is not
                        # watchfiles gives up on a name that is not UTF-8, say; a fresh watch
                        # and a full rescan (which diagnoses such a file) carry on.
                        log.warning("directory watch failed (%s); watching again", e)
                        await asyncio.sleep(0.1)
                        rearm = True
                        break
                    self.batches += 1
                    paths = {p for _, p in changes}
                    # A watched directory went away (its watch is dead) or a missing one
                    # appeared: watch the new set of directories.
                    if roots & paths or self._roots() != roots:
                        rearm = True
                        break
                    paths.update(self.index.symlinked_paths())
                    self._apply(self.index.update_files(paths))
                    nxt = asyncio.ensure_future(watch.__anext__())
            finally:
                arm_stop.set()
                stopper.cancel()
                if not nxt.done():
                    try:
                        await nxt
                    except (StopAsyncIteration, FileNotFoundError, asyncio.CancelledError):
                        pass
                    except Exception:
                        log.exception("watcher ended with an error")
                await watch.aclose()
            if rearm:
                log.debug("watched directories changed; re-arming on %s", sorted(self._roots()))
