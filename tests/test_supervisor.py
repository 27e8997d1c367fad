"""The supervisor on its own (`vhostuserd.edges.supervisor.Supervisor`, docs/contract.md section
3: the Backend object, Stop, GetLog; section 2: --grace-period, --state-dir): the fake
backends of tests/fake_backends/ as real processes, the real reaper, a real asyncio loop in
the test process, and no bus.

How a backend that ignores SIGTERM is stopped, what its log keeps, that ids are never reused,
also by the next supervisor on the same state directory (as after a restart of the daemon),
and that a settle time of 0 does not wait. What the child did is read from /proc or from the
report the fake writes. tests/test_spawn.py proves on the bus that Spawn, Stop, GetLog and
Exited reach these, and what a child gets from the daemon (its fds, cwd, session, env).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from busutil import Tree, await_for
from helpers_spawn import (
    Fake,
    gone,
    install,
    kill_marked,
    wait_none_marked,
)

from vhostuserd.edges import procs
from vhostuserd.edges.supervisor import EXITED, STOPPING, Backend, SpawnError, Supervisor


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Tree]:
    """A test tree; whatever a failing test left running is killed."""
    t = Tree.make(tmp_path)
    yield t
    kill_marked(t)


def state_dir(tree: Tree) -> Path:
    return tree.root / "run" / "vhostuserd"  # where kill_marked looks for records


def supervising(
    tree: Tree, body: Callable[[Supervisor], Awaitable[None]], grace_period: float = 1.0
) -> None:
    """Run ``body`` with a supervisor of its own on ``tree``'s state directory; the
    backends it left running are stopped after."""

    async def main() -> None:
        reaper = procs.Reaper(asyncio.get_running_loop())
        reaper.install()
        sup = Supervisor(reaper, str(state_dir(tree)), grace_period, on_change=lambda b, w: None)
        try:
            await body(sup)
        finally:
            for b in list(sup.backends.values()):
                await sup.stop(b)
            reaper.uninstall()

    asyncio.run(asyncio.wait_for(main(), 60))


def start(sup: Supervisor, fake: Fake | str, socket_fd: int | None = None) -> Backend:
    """``fake`` started as the daemon starts a backend: BINARY --fd=3, with a socket at fd 3."""
    binary = str(fake.path) if isinstance(fake, Fake) else fake
    ours, theirs = socket.socketpair()
    try:
        return sup.spawn(
            descriptor=f"50-{os.path.basename(binary)}.json",
            argv=(binary, "--fd=3"),
            socket_fd=theirs.fileno() if socket_fd is None else socket_fd,
            owner=":1.42",
            owner_uid=os.getuid(),
            detached=False,
        )
    finally:
        ours.close()
        theirs.close()


async def report(fake: Fake, pid: int) -> dict[str, Any]:
    """What the backend with ``pid`` reported about itself, waited for on the loop (the
    supervisor reads the backend's output meanwhile)."""
    path = fake.report_dir / f"{pid}.json"
    await await_for(path.exists, f"the report of {fake.path.name} pid {pid}")
    return fake.report(pid)


def test_a_backend_ignoring_sigterm_is_killed_with_its_whole_group_at_the_grace_period(
    tree: Tree,
) -> None:
    stubborn = install(tree, "forks_grandchild", "gpu", [], short="stubborn", ignore_sigterm=True)

    async def body(sup: Supervisor) -> None:
        b = start(sup, stubborn)
        got = await report(stubborn, b.pid)
        grandchild = got["grandchild"]
        assert got["grandchild_pgid"] == b.pid
        t0 = time.monotonic()
        stopping = sup.stop(b)
        await await_for(lambda: b.state == STOPPING or stopping.done(), "the stop to begin")
        assert b.state == STOPPING, "stopped before the grace period"
        await asyncio.wait_for(stopping, 10)
        elapsed = time.monotonic() - t0
        # SIGKILL came at the grace period (1 s), not before and not much later.
        assert 0.95 <= elapsed <= 2.5, elapsed
        assert gone(b.pid)
        assert (b.state, b.exit_status, b.exit_signal) == (EXITED, -1, signal.SIGKILL)
        # The helper it forked (same group, also ignoring SIGTERM) went with it.
        await await_for(lambda: gone(grandchild), f"the grandchild {grandchild} to be gone", 2.0)
        wait_none_marked(tree, 2.0)

    supervising(tree, body, grace_period=1.0)


def test_the_log_keeps_the_last_64_kib_of_the_output_with_its_end_intact(tree: Tree) -> None:
    chatty = install(tree, "chatty", "gpu", [], short="chatty", lines=4000)
    quiet = install(tree, "honours_sigterm", "gpu", [], short="quiet")

    def text(b: Backend) -> str:
        return bytes(b.log).decode("utf-8", "replace")

    async def body(sup: Supervisor) -> None:
        b = start(sup, chatty)
        await report(chatty, b.pid)
        await await_for(lambda: "fake backend report:" in text(b), "the whole output in the log")
        log = text(b)
        # About 256 KiB were written; the last 64 KiB are kept, the end intact.
        assert len(log.encode()) == 64 * 1024, len(log.encode())
        assert "line 0003999 " in log and "chatty: END OF OUTPUT\n" in log
        assert "line 0000000 " not in log
        assert log.endswith("\n") and log.rstrip("\n").splitlines()[-1].startswith(
            "fake backend report:"
        )
        q = start(sup, quiet)
        await report(quiet, q.pid)
        await await_for(lambda: "fake backend report:" in text(q), "the quiet log")
        assert text(q).startswith("fake backend report:") and text(q).count("\n") == 1, text(q)

    supervising(tree, body)


def test_ids_are_never_reused_also_by_the_next_supervisor_on_the_same_state_directory(
    tree: Tree,
) -> None:
    fake = install(tree, "honours_sigterm", "gpu", [], short="term")
    dies = install(tree, "exits", "gpu", [], short="dies")
    seen: list[str] = []

    async def cycle(sup: Supervisor) -> None:
        for _ in range(2):
            b = start(sup, fake)
            await sup.settle(b, 250)
            seen.append(b.id)
            await sup.stop(b)
        d = start(sup, dies)
        seen.append(d.id)
        with pytest.raises(SpawnError):
            await sup.settle(d, 2000)

    supervising(tree, cycle)
    supervising(tree, cycle)  # a new supervisor: the daemon's next start
    assert len(set(seen)) == len(seen) == 6, seen
    numbers = [int(i) for i in seen]
    assert numbers == sorted(numbers), seen


def test_a_settle_time_of_0_returns_at_once_and_the_exit_comes_after(tree: Tree) -> None:
    fake = install(tree, "exits", "gpu", [], short="dies", status=5)

    async def body(sup: Supervisor) -> None:
        # The same backend fails the default settle time (250 ms) ...
        b = start(sup, fake)
        with pytest.raises(SpawnError, match="exited with status 5"):
            await sup.settle(b, 250)
        # ... but a settle time of 0 does not wait for it to fail.
        late = start(sup, fake)
        await sup.settle(late, 0)
        assert late.state != EXITED
        await await_for(lambda: late.state == EXITED, "the backend's exit, after the settle")
        assert (late.exit_status, late.exit_signal) == (5, -1)

    supervising(tree, body)
