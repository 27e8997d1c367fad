"""The live index: the effective descriptor list kept current as the directories change.

Owns the incremental form of the tier merge (a change to one file re-decides that one name,
so its cost does not grow with the number of descriptors) and the generation counter. Pure
state: it is fed whole tier listings and single files by `vhostuserd.edges.watch.Feed`,
which reads them when the watcher says so. The full merge in `lookup` stays the reference: after
any sequence of changes the index equals ``lookup.merge`` of a fresh scan, but for names
that are not UTF-8, which D-Bus cannot carry: the index diagnoses those instead.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from vhostuserd.core.descriptors import ERROR, Descriptor, Diagnostic, Parsed
from vhostuserd.core.lookup import Directory, Listing, sort_key


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
        self._entries: list[dict[str, Parsed]] = [{} for _ in self.dirs]
        self._dir_diags: list[tuple[Diagnostic, ...]] = [() for _ in self.dirs]
        self._winners: dict[str, Parsed] = {}
        self._descriptors: dict[str, Descriptor] = {}
        self._order: list[bytes] = []  # sort keys of effective names, kept sorted
        self._sorted: tuple[Descriptor, ...] | None = ()
        self._diagnostics: tuple[Diagnostic, ...] | None = ()
        self.tier_of = {d.path: i for i, d in enumerate(self.dirs)}  # directory -> its tier

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

    def live_paths(self) -> set[str]:
        """The path of every candidate file the index holds, in every tier."""
        return {f"{d.path}/{n}" for d, e in zip(self.dirs, self._entries, strict=True) for n in e}

    def replace_tiers(self, listings: Mapping[int, Listing]) -> Change:
        """Whole tiers re-listed (by `vhostuserd.edges.watch.Feed`): their entries replaced."""
        change = Change()
        names: set[str] = set()
        for i, listing in listings.items():
            entries, diagnostics = _sendable_listing(listing)
            names.update(self._entries[i])
            names.update(entries)
            self._entries[i] = entries
            if diagnostics != self._dir_diags[i]:
                self._dir_diags[i] = diagnostics
                change.diagnostics_changed = True
        for name in names:
            self._decide(name, change)
        return self._finish(change)

    def update_entries(self, updates: Iterable[tuple[int, str, Parsed | None]]) -> Change:
        """Single candidates re-read: (tier, name, what it holds now, None: gone)."""
        change = Change()
        names: set[str] = set()
        for i, name, parsed in updates:
            if parsed is None:
                self._entries[i].pop(name, None)
            else:
                self._entries[i][name] = parsed
            names.add(name)
        for name in names:
            self._decide(name, change)
        return self._finish(change)


def sendable(text: str) -> bool:
    """Whether D-Bus can carry ``text``: its strings are UTF-8. os.listdir keeps bytes that
    are not as lone surrogates, which the daemon could neither list nor export."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(text: str) -> str:
    if sendable(text):
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _sendable_listing(listing: Listing) -> tuple[dict[str, Parsed], tuple[Diagnostic, ...]]:
    """A directory's entries and diagnostics as the daemon can serve them: a candidate whose
    path is not UTF-8 is left out with an error instead (lookup itself, which sorts such
    names by their bytes, keeps them: this is the one way the index differs from it)."""
    entries: dict[str, Parsed] = {}
    diagnostics = [
        Diagnostic(_printable(d.path), d.level, _printable(d.message)) for d in listing.diagnostics
    ]
    for name, parsed in listing.entries.items():
        path = f"{listing.directory.path}/{name}"
        if sendable(path):
            entries[name] = parsed
        else:
            diagnostics.append(
                Diagnostic(
                    _printable(path),
                    ERROR,
                    "file name is not valid UTF-8, which D-Bus cannot carry; ignored",
                )
            )
    return entries, tuple(diagnostics)
