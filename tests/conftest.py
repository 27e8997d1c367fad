"""Shared fixtures: one real private dbus-daemon per test session, a fresh descriptor tree
and a real vhostuserd per test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from busutil import Daemon, PrivateBus, Tree


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
