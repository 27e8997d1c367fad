"""A broken descriptor is never silent in the daemon's log (issue 11, item 5): a diagnostic
that is new or changed is logged once, at warning, at start-up and when a file changes."""

from __future__ import annotations

from collections.abc import Callable

from busutil import Daemon, Tree, descriptor, wait_for

StartDaemon = Callable[..., Daemon]


def _warnings(d: Daemon, path: str) -> list[str]:
    return [line for line in d.log().splitlines() if ": warning: " in line and path in line]


def test_a_broken_file_is_logged_at_warning_once_when_it_appears_and_again_when_it_changes(
    tree: Tree, start_daemon: StartDaemon
) -> None:
    tree.write("data", "50-gpu.json", descriptor("gpu"))
    broken_at_start = tree.write("sysconf", "40-early.json", b"{")
    d = start_daemon()
    wait_for(lambda: _warnings(d, str(broken_at_start)), "the start-up warning")
    broken = tree.write(
        "user", "50-gpu.json", b'{"type": "gpu", "binary": "/usr/bin/true"'
    )  # truncated
    wait_for(lambda: _warnings(d, str(broken)), "a warning for the broken user-tier file")
    first = _warnings(d, str(broken))
    assert len(first) == 1, first
    tree.write(
        "user", "50-gpu.json", b'{"type": "gpu", "binary": "relative"}'
    )  # broken differently
    wait_for(lambda: len(_warnings(d, str(broken))) == 2, "a warning for the changed diagnostic")
    assert "/binary" in _warnings(d, str(broken))[1]
    # Fixed: no new warning; the start-up one was not repeated by any of these changes.
    tree.write("user", "50-gpu.json", descriptor("gpu"))
    wait_for(
        lambda: "descriptor changed" in d.log() or "descriptor added" in d.log(),
        "the fix to be seen",
    )
    assert len(_warnings(d, str(broken))) == 2
    assert len(_warnings(d, str(broken_at_start))) == 1
