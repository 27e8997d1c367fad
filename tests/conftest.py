"""Shared fixtures: one real private dbus-daemon per test session, a fresh descriptor tree
and a real vhostuserd per test; for the authorization tests, a private system bus per module
and python-dbusmock's polkitd on it (a module may define its own `polkit`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from busutil import Daemon, PrivateBus, Tree
from helpers_auth import DbusmockPolkit, system_bus


def _nested_cgroups() -> set[Path]:
    """The daemons' "nested" cgroup subtrees (vhostuserd-*) beside this test run's processes."""
    from vhostuserd.edges import cgroup

    mount = cgroup.v2_mount()
    if mount is None:
        return set()
    try:
        with open("/proc/self/cgroup") as f:
            own = next(line[3:].strip() for line in f if line.startswith("0::"))
    except (OSError, StopIteration):
        return set()
    return set((Path(mount) / own.lstrip("/")).glob("vhostuserd-*"))


@pytest.fixture(scope="session", autouse=True)
def _sweep_cgroups() -> Iterator[None]:
    """Remove the empty cgroups that daemons killed by tests left behind (only those made
    during this run; rmdir refuses any that still holds a process or a child)."""
    before = _nested_cgroups()
    yield
    for top in _nested_cgroups() - before:
        for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            try:
                d.rmdir()
            except OSError:
                pass
        try:
            top.rmdir()
        except OSError:
            pass


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
