"""The live index agrees with the pure merge after any sequence of file changes.

`vhostuserd.core.index.Index`, fed by `vhostuserd.edges.watch.Feed`, updates one name at a time
as files change; `lookup.merge` of a fresh `scan.list_all` is the reference (index.py says
so). Hypothesis drives random sequences of real file operations in three directories of
different tiers and checks, after every step, descriptors, diagnostics, and that the
generation moves exactly when the effective descriptors changed. In-process and bus-free.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhostuserd.core import lookup
from vhostuserd.core.index import Index
from vhostuserd.edges import scan
from vhostuserd.edges.watch import Feed

TIERS = ("user", "sysconf", "data")  # most specific first, as search_path orders them
NAMES = ("10-a.json", "20-b.json", "30-c.json", "b.json")

CONTENT = {
    "valid-gpu": json.dumps({"description": "gpu", "type": "gpu", "binary": "/usr/bin/gpu"}),
    "valid-gpu-2": json.dumps(
        {"description": "gpu two", "type": "gpu", "binary": "/usr/bin/gpu", "tags": ["x"]}
    ),
    "valid-input": json.dumps({"description": "input", "type": "input", "binary": "/usr/bin/in"}),
    # Valid with a warning: an unknown type and no description.
    "warning": json.dumps({"type": "frobnicator", "binary": "/usr/bin/frob"}),
    "broken-json": "{not json",
    "broken-schema": json.dumps({"type": "gpu", "binary": "relative"}),
    "empty": "",
}

OPS = (*CONTENT, "delete", "dangling-symlink", "directory")

step = st.lists(
    st.tuples(st.integers(0, len(TIERS) - 1), st.sampled_from(NAMES), st.sampled_from(OPS)),
    min_size=1,
    max_size=3,
)


def apply(path: Path, op: str) -> None:
    """Make ``path`` be what ``op`` says, whatever it was before."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    if op == "delete":
        return
    if op == "dangling-symlink":
        path.symlink_to(path.parent / "no-such-target")
    elif op == "directory":
        path.mkdir()
    else:
        path.write_text(CONTENT[op])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    initial=st.lists(step, max_size=2),
    steps=st.lists(step, min_size=1, max_size=12),
    noise=st.booleans(),
)
def test_index_equals_a_fresh_merge_after_every_step(
    initial: list[list[tuple[int, str, str]]], steps: list[list[tuple[int, str, str]]], noise: bool
) -> None:
    with tempfile.TemporaryDirectory(prefix="vhostuserd-model-") as root:
        dirs = tuple(lookup.Directory(tier, f"{root}/{tier}/qemu/vhost-user") for tier in TIERS)
        for d in dirs:
            os.makedirs(d.path)
        for ops in initial:
            for i, name, op in ops:
                apply(Path(dirs[i].path) / name, op)
        feed = Feed(Index(dirs))
        index = feed.index
        feed.rescan()

        def check(where: str) -> None:
            ref = lookup.merge(scan.list_all(dirs))
            assert index.descriptors == ref.descriptors, where
            assert index.diagnostics == ref.diagnostics, where
            for d in ref.descriptors:
                assert index.get(d.name) == d, where

        check("after the initial rescan")
        for n, ops in enumerate(steps):
            before_descriptors, before_generation = index.descriptors, index.generation
            before_diagnostics = index.diagnostics
            paths = []
            for i, name, op in ops:
                path = Path(dirs[i].path) / name
                apply(path, op)
                paths.append(str(path))
            if noise:
                # What the watcher also passes along: temporaries, other names, other dirs.
                paths += [
                    f"{dirs[0].path}/.{NAMES[0]}.tmp",
                    f"{dirs[1].path}/README",
                    f"{root}/elsewhere/{NAMES[0]}",
                ]
            change = feed.update_files(paths)
            where = f"after step {n}: {ops}"
            check(where)
            changed = index.descriptors != before_descriptors
            assert index.generation == before_generation + (1 if changed else 0), where
            assert change.effective == changed, where
            # Diagnostics are signalled exactly when they changed.
            assert change.diagnostics_changed == (index.diagnostics != before_diagnostics), where
            # The change lists what happened, by name.
            old = {d.name: d for d in before_descriptors}
            new = {d.name: d for d in index.descriptors}
            assert sorted(d.name for d in change.added) == sorted(new.keys() - old.keys()), where
            assert sorted(d.name for d in change.removed) == sorted(old.keys() - new.keys()), where
            assert sorted(d.name for d in change.changed) == sorted(
                k for k in old.keys() & new.keys() if old[k] != new[k]
            ), where
        # A full rescan at the end finds nothing the incremental updates missed.
        generation = index.generation
        assert not feed.rescan().effective
        assert index.generation == generation
        check("after the final rescan")
