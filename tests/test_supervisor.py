"""The supervisor on its own (`vhostuserd.edges.supervisor.Supervisor`, docs/contract.md section
3: the Backend object, Stop, GetLog; section 2: --grace-period, --state-dir): the fake
backends of tests/fake_backends/ as real processes, the real reaper, a real asyncio loop in
the test process, and no bus.

How a backend that ignores SIGTERM is stopped, what its log keeps, that ids are never reused,
also by the next supervisor on the same state directory (as after a restart of the daemon),
that a settle time of 0 does not wait; and each backend in a cgroup v2 of its own (issue 14
part 2): entered before its first instruction, ended whole by a stop, measured, and limited
as the admin's cgroup.conf says. What the child did is read from /proc or from the
report the fake writes. tests/test_spawn.py proves on the bus that Spawn, Stop, GetLog and
Exited reach these, and what a child gets from the daemon (its fds, cwd, session, env).
"""

from __future__ import annotations

import asyncio
import logging
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

from vhostuserd.core.lifecycle import State
from vhostuserd.edges import cgroup, procs
from vhostuserd.edges.cgroup import CONTROLLERS, Cgroups
from vhostuserd.edges.supervisor import Backend, SpawnError, Supervisor


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Tree]:
    """A test tree; whatever a failing test left running is killed."""
    t = Tree.make(tmp_path)
    yield t
    kill_marked(t)


def state_dir(tree: Tree) -> Path:
    return tree.root / "run" / "vhostuserd"  # where kill_marked looks for records


def supervising(
    tree: Tree,
    body: Callable[[Supervisor], Awaitable[None]],
    grace_period: float = 1.0,
    cgroups: Cgroups | None = None,
) -> None:
    """Run ``body`` with a supervisor of its own on ``tree``'s state directory; the
    backends it left running are stopped after."""

    async def main() -> None:
        reaper = procs.Reaper(asyncio.get_running_loop())
        reaper.install()
        sup = Supervisor(
            reaper, str(state_dir(tree)), grace_period, on_change=lambda b, w: None, cgroups=cgroups
        )
        try:
            await body(sup)
        finally:
            for b in list(sup.backends.values()):
                await sup.stop(b)
            reaper.uninstall()

    asyncio.run(asyncio.wait_for(main(), 60))


def start(
    sup: Supervisor, fake: Fake | str, socket_fd: int | None = None, **limits: str
) -> Backend:
    """``fake`` started as the daemon starts a backend: BINARY --fd=3, with a socket at fd 3
    (and the admin's cgroup ``limits``)."""
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
            limits=limits or None,
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
        steps: list[State] = []
        sup.on_change = lambda _b, step: steps.append(step.after)
        t0 = time.monotonic()
        await asyncio.wait_for(sup.stop(b), 10)
        elapsed = time.monotonic() - t0
        # SIGTERM, then SIGKILL once the grace period ran out, then its exit.
        assert steps == [State.STOPPING, State.KILLING, State.EXITED], steps
        # SIGKILL came at the grace period (1 s), not before and not much later.
        assert 0.95 <= elapsed <= 2.5, elapsed
        assert gone(b.pid)
        assert (b.life.state, b.exit_status, b.exit_signal) == (State.EXITED, -1, signal.SIGKILL)
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
        assert late.life.alive
        await await_for(lambda: not late.life.alive, "the backend's exit, after the settle")
        assert late.life.state is State.EXITED
        assert (late.exit_status, late.exit_signal) == (5, -1)

    supervising(tree, body)


# ---------------------------------------------------------------- each backend in a cgroup


@pytest.fixture
def cgroups(tree: Tree) -> Iterator[Cgroups]:
    """The supervisor's cgroup subtree, in nested mode under an empty cgroup made for the test
    beside this process (so that this process is never moved; named vhostuserd-* like the
    daemons', which conftest sweeps if a test leaves it), with the controllers its parent
    offers enabled as a daemon's parent would."""
    mount, own = cgroup.v2_mount(), cgroup.own_cgroup()
    if mount is None or own is None:
        pytest.skip("no cgroup v2 hierarchy is mounted on this machine")
    rel = f"{own.rstrip('/')}/vhostuserd-tests-{os.getpid()}-{tree.root.name}"
    here = os.path.join(mount, rel.lstrip("/"))
    try:
        os.mkdir(here)
    except OSError as e:
        pytest.skip(f"cannot make a cgroup v2 under {own}: {e.strerror}")
    offered = Path(here, "cgroup.controllers").read_text().split()
    for c in CONTROLLERS:
        if c in offered:
            try:
                Path(here, "cgroup.subtree_control").write_text(f"+{c}")
            except OSError:
                pass
    cg = Cgroups.setup(str(state_dir(tree)), own=rel)
    try:
        if not cg.enabled:
            pytest.skip(f"the supervisor runs without cgroups here: {cg.why}")
        yield cg
    finally:
        cg.release()
        for d in (cg.base, here):
            if d:
                Cgroups.remove(d)


def test_a_backend_whose_grandchild_setsids_and_ignores_sigterm_leaves_nothing_after_stop(
    tree: Tree, cgroups: Cgroups, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vhostuserd.supervisor")
    fake = install(tree, "daemonizes", short="daemon", ignore_sigterm=True)

    async def body(sup: Supervisor) -> None:
        b = start(sup, fake)
        got = await report(fake, b.pid)
        grandchild = got["grandchild"]
        # It escaped the group and the session (as a group kill cannot reach), not the cgroup.
        assert got["grandchild_sid"] != os.getsid(b.pid) == b.pid
        assert os.getpgid(grandchild) != b.pid
        assert cgroup.own_cgroup(b.pid) == cgroup.own_cgroup(grandchild)
        assert cgroup.own_cgroup(b.pid) == cgroups.relative(b.cgroup)
        assert os.path.basename(b.cgroup) == f"backend-{b.id}"
        await asyncio.wait_for(sup.stop(b), 10)
        await await_for(
            lambda: gone(b.pid) and gone(grandchild) and not os.path.exists(b.cgroup),
            lambda: f"backend {b.pid}, setsid grandchild {grandchild} and {b.cgroup} gone",
            5,
        )
        wait_none_marked(tree, 5.0)

    supervising(tree, body, grace_period=0.5, cgroups=cgroups)
    assert "consumed" in caplog.text  # what it cost, said when it ended


def test_a_backend_is_in_its_cgroup_from_its_first_instruction(
    tree: Tree, cgroups: Cgroups
) -> None:
    """The supervisor's child is the launcher that enters the cgroup and execs the backend:
    the backend program (here a shell that only reports its cgroup) never runs outside it."""
    script = tree.root / "bin" / "where.sh"
    script.parent.mkdir(exist_ok=True)
    out = tree.root / "where.txt"
    script.write_text(
        f"#!/bin/sh\ngrep '^0::' /proc/self/cgroup > {out}.tmp; mv {out}.tmp {out}\n"
        "exec sleep 1000\n"
    )
    script.chmod(0o755)

    async def body(sup: Supervisor) -> None:
        b = start(sup, str(script))
        await await_for(out.exists, "the backend's report of its cgroup")
        assert out.read_text().strip() == f"0::{cgroups.relative(b.cgroup)}"
        await sup.stop(b)

    supervising(tree, body, cgroups=cgroups)


def test_a_backend_that_burns_cpu_shows_more_cpu_time_than_an_idle_one_and_it_grows_with_work(
    tree: Tree, cgroups: Cgroups
) -> None:
    busy = install(tree, "daemonizes", short="busy", burn_s=0.4)
    idle = install(tree, "daemonizes", short="idle")

    async def body(sup: Supervisor) -> None:
        b, i = start(sup, busy), start(sup, idle)
        await report(busy, b.pid)  # it has burned its 0.4 s of CPU
        await report(idle, i.pid)
        burned, idled = sup.usage(b).cpu_usec, sup.usage(i).cpu_usec
        assert burned >= 400_000 > idled >= 0, (burned, idled)
        # After the stop: the final numbers stay with the exited backend.
        await sup.stop(b)
        assert b.life.state is State.EXITED and sup.usage(b).cpu_usec >= burned
        await sup.stop(i)

    supervising(tree, body, cgroups=cgroups)


def test_memory_and_tasks_are_measured_where_those_controllers_are_enabled(
    tree: Tree, cgroups: Cgroups
) -> None:
    fake = install(tree, "daemonizes", short="daemon")

    async def body(sup: Supervisor) -> None:
        b = start(sup, fake)
        await report(fake, b.pid)
        u = sup.usage(b)
        await sup.stop(b)
        missing = []
        for name, value, controller in (
            ("memory_current", u.memory_current, "memory"),
            ("memory_peak", u.memory_peak, "memory"),
            ("tasks", u.tasks, "pids"),
        ):
            if controller in cgroups.controllers:
                assert value > 0, (name, value)
            else:
                assert value == -1, (name, value)  # not measured: never a made-up number
                missing.append(f"{name} ({controller})")
        if missing:
            pytest.skip(
                f"not measured here: {', '.join(missing)}: those controllers are not enabled "
                f"for the cgroup v2 subtree (enabled: {' '.join(cgroups.controllers) or 'none'})"
            )

    supervising(tree, body, cgroups=cgroups)


def test_the_admins_limits_are_written_to_the_backends_cgroup_where_their_controllers_are_enabled(
    tree: Tree, cgroups: Cgroups, caplog: pytest.LogCaptureFixture
) -> None:
    fake = install(tree, "daemonizes", short="daemon")
    conf = tree.sysconfdir / cgroup.CONFIG
    conf.parent.mkdir(parents=True, exist_ok=True)
    # The descriptor's own section wins over its type's.
    conf.write_text(
        f"[type:gpu]\ntasks-max = 8\ncpu-weight = 20\n[{fake.name}]\nmemory-max = 64M  # per VM\n"
        "tasks-max = 32\n"
    )
    limits = cgroup.limits_for("gpu", fake.name, str(tree.sysconfdir))
    assert limits == {"tasks-max": "32", "cpu-weight": "20", "memory-max": str(64 << 20)}
    expected = {
        "memory.max": ("memory", str(64 << 20)),
        "pids.max": ("pids", "32"),
        "cpu.weight": ("cpu", "20"),
    }

    async def body(sup: Supervisor) -> None:
        b = start(sup, fake, **limits)
        await report(fake, b.pid)
        for name, (controller, value) in expected.items():
            if controller in cgroups.controllers:
                assert Path(b.cgroup, name).read_text().strip() == value, name
        await sup.stop(b)

    supervising(tree, body, cgroups=cgroups)
    missing = [c for c in ("memory", "pids", "cpu") if c not in cgroups.controllers]
    for controller in missing:  # said, not silently dropped
        assert f"the {controller} controller is not enabled here" in caplog.text, controller
    if missing:
        pytest.skip(
            f"limits not applied here for {', '.join(missing)}: those controllers are not "
            "enabled for the cgroup v2 subtree (the supervisor logged so)"
        )
