"""Shared fixtures: one real private dbus-daemon per test session, a fresh descriptor tree
and a real vhostuserd per test; for the authorization tests, a private system bus per module
and python-dbusmock's polkitd on it (a module may define its own `polkit`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from busutil import Daemon, PrivateBus, Tree
from helpers_auth import DbusmockPolkit, system_bus


@pytest.fixture(scope="session")
def bus() -> Iterator[PrivateBus]:
    b = PrivateBus()
    yield b
    b.close()


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return Tree.make(tmp_path)


@pytest.fixture
def start_daemon(bus: PrivateBus, tree: Tree) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(*args: str, wait: bool = True) -> Daemon:
        d = Daemon(bus, tree, *args, wait=wait)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


@pytest.fixture(scope="module")
def sysbus() -> Iterator[PrivateBus]:
    """A private bus of type system that every uid may connect to."""
    b = system_bus()
    yield b
    b.close()


@pytest.fixture(scope="module")
def polkit(sysbus: PrivateBus) -> Iterator[DbusmockPolkit]:
    """python-dbusmock's polkitd template on ``sysbus`` (run by Debian's python3)."""
    try:
        p = DbusmockPolkit(sysbus)
    except RuntimeError as e:
        pytest.skip(str(e))
    yield p
    p.close()
