"""Each backend in a cgroup v2 of its own (issue 14 part 2), against the real daemon, real
processes and the machine's real cgroup v2 hierarchy.

What the supervisor does with a backend's cgroup (entered before the first instruction, ended
whole by Stop, measured, limited as cgroup.conf says) is tested on the supervisor alone in
tests/test_supervisor.py; here, the daemon's side: its subtree and its start-up line, a
backend stopped with its cgroup when its owner leaves, re-adoption after a restart,
cgroup.conf read at each Spawn, and what `vhostuserctl status` and `backends` show.

Where the daemon finds no usable cgroup v2 the tests that need one skip saying so; the
controller-specific parts (memory, pids) skip where those controllers are not enabled (this
machine's hybrid layout has memory on v1), printing the reason.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from busutil import Daemon, PrivateBus, Tree, await_for, run, wait_for
from helpers_spawn import Client, gone, install, kill_marked, proc_stat, spawn, wait_none_marked

from vhostuserd.edges import cgroup

StartDaemon = Callable[..., Daemon]
GRACE = 0.5


@pytest.fixture(autouse=True)
def no_leftovers(tree: Tree) -> Iterator[None]:
    yield
    kill_marked(tree)


def mount_or_skip() -> str:
    mount = cgroup.v2_mount()
    if mount is None:
        pytest.skip("no cgroup v2 hierarchy is mounted on this machine")
    return mount


def cgroup_dir(props: dict[str, Any]) -> str:
    """The backend's cgroup directory, skipping when the daemon runs without cgroups."""
    mount = mount_or_skip()
    if not props["Cgroup"]:
        pytest.skip("the daemon runs without cgroups here (its start-up log says why)")
    return os.path.join(mount, props["Cgroup"].lstrip("/"))


def in_cgroup(pid: int) -> str | None:
    return cgroup.own_cgroup(pid)


def backend_left_nothing(path: str, pids: list[int]) -> bool:
    return all(gone(p) for p in pids) and not os.path.exists(path)


def test_a_backend_whose_grandchild_setsids_and_ignores_sigterm_leaves_nothing_after_owner_leaves(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    fake = install(tree, "daemonizes", short="daemon", ignore_sigterm=True)
    start_daemon("--grace-period", str(GRACE))

    async def main() -> None:
        c = await Client.open(bus.address)
        watcher = await Client.open(bus.address)
        _path, props = await spawn(c, fake, tree.root)
        pid = props["Pid"]
        grandchild = fake.report(pid)["grandchild"]
        where = cgroup_dir(props)
        assert in_cgroup(grandchild) == props["Cgroup"]
        await c.close()  # the owner leaves the bus
        await await_for(
            lambda: backend_left_nothing(where, [pid, grandchild]),
            lambda: (
                f"backend {pid}, setsid grandchild {grandchild} and {where} gone: "
                f"{proc_stat(grandchild)}, exists {os.path.exists(where)}"
            ),
            GRACE + 5,
        )
        await watcher.close()

    run(main())
    wait_none_marked(tree, 5.0)


def test_a_sigkilled_daemon_restarted_readopts_the_backend_in_its_cgroup_and_stop_ends_all_of_it(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    fake = install(tree, "daemonizes", short="daemon", ignore_sigterm=True)
    first = start_daemon("--grace-period", str(GRACE))

    async def main() -> None:
        c = await Client.open(bus.address, record=False)
        path, props = await spawn(c, fake, tree.root)
        pid = props["Pid"]
        grandchild = fake.report(pid)["grandchild"]
        where = cgroup_dir(props)
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL
        assert not gone(pid) and not gone(grandchild) and os.path.isdir(where)
        second = start_daemon("--grace-period", str(GRACE))
        again = await c.backend(path)
        assert again["Cgroup"] == props["Cgroup"] and again["Pid"] == pid
        assert again["CpuUsec"] >= 0
        assert "re-adopted" in second.log()
        await asyncio.wait_for(c.stop(path), 10)
        await await_for(
            lambda: backend_left_nothing(where, [pid, grandchild]),
            lambda: f"re-adopted backend {pid}, grandchild {grandchild} and {where} gone",
            5,
        )
        await c.close()

    run(main())
    wait_none_marked(tree, 5.0)


def test_setup_reports_off_with_the_reason_when_no_cgroup_v2_is_mounted(tmp_path: Any) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
        "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
    )
    assert cgroup.v2_mount(str(mountinfo)) is None
    cg = cgroup.Cgroups.setup(str(tmp_path), mountinfo=str(mountinfo))
    assert not cg.enabled and "no cgroup v2" in cg.why
    assert cg.describe().startswith("off: ")


def test_the_daemon_says_once_at_start_up_how_backends_are_placed(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    d = start_daemon()
    wait_for(lambda: "cgroups of their own" in d.log(), "the start-up line about cgroups")
    assert d.log().count("cgroups of their own") == 1


def test_status_shows_how_backends_are_placed_in_text_and_json(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    import json

    from busutil import ctl

    start_daemon()
    text = ctl(bus, tree, "status")
    assert text.returncode == 0, text.stderr
    line = next(x for x in text.stdout.splitlines() if x.startswith("backend cgroups: "))
    doc = json.loads(ctl(bus, tree, "--json", "status").stdout)
    assert line == f"backend cgroups: {doc['cgroups']}"
    mount = cgroup.v2_mount()
    if mount is None:
        assert doc["cgroups"].startswith("off: "), doc
    else:
        mode, _, rest = doc["cgroups"].partition(": ")
        assert mode in ("delegated", "nested", "off"), doc
        if mode != "off":
            assert os.path.isdir(os.path.join(mount, rest.split(" (")[0].lstrip("/"))), doc


def test_the_cgroup_of_a_backend_that_died_while_no_daemon_ran_is_removed_at_the_next_start(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    fake = install(tree, "daemonizes", short="daemon")
    first = start_daemon("--grace-period", str(GRACE))

    async def main() -> str:
        c = await Client.open(bus.address, record=False)
        _path, props = await spawn(c, fake, tree.root)
        pid = props["Pid"]
        grandchild = fake.report(pid)["grandchild"]
        where = cgroup_dir(props)
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL
        Path(where, "cgroup.kill").write_text("1")  # the backend and its helper die meanwhile
        wait_for(lambda: gone(pid) and gone(grandchild), "the backend killed while no daemon runs")
        await c.close()
        return where

    where = run(main())
    assert os.path.isdir(where)
    second = start_daemon("--grace-period", str(GRACE))
    wait_for(lambda: not os.path.exists(where), f"{where} removed by the restarted daemon")
    assert "is gone; record removed" in second.log()


def write_limits(tree: Tree, text: str) -> Path:
    path = Path(tree.sysconfdir) / "vhostuserd" / "cgroup.conf"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_broken_cgroup_conf_is_a_typed_spawn_failure_naming_file_section_and_setting(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    from vhostuserd.client import SpawnFailed

    fake = install(tree, "daemonizes", short="daemon")
    conf = write_limits(tree, f"[{fake.name}]\nmemory-max = lots\n")
    d = start_daemon()

    async def main() -> None:
        c = await Client.open(bus.address)
        with pytest.raises(SpawnFailed) as e:
            await spawn(c, fake, tree.root)
        assert str(conf) in str(e.value) and f"[{fake.name}] memory-max = 'lots'" in str(e.value), (
            e.value
        )
        assert fake.reports() == []  # nothing started
        conf.write_text("[type:gpu]\nswap-max = 1G\n")
        with pytest.raises(SpawnFailed, match="swap-max: unknown setting"):
            await spawn(c, fake, tree.root)
        await c.close()

    run(main())
    assert d.proc.poll() is None


def test_limit_values_are_parsed_to_what_the_cgroup_files_take() -> None:
    got = cgroup.parse_limits(
        "[type:fs]\nmemory-max = 2G\ntasks-max = max\n[50-x.json]\ncpu-weight = 100\n"
        "memory-max = 512k\n",
        "cgroup.conf",
    )
    assert got == {
        "type:fs": {"memory-max": str(2 << 30), "tasks-max": "max"},
        "50-x.json": {"cpu-weight": "100", "memory-max": "524288"},
    }
    for bad in (
        "memory-max = 0",
        "tasks-max = -1",
        "cpu-weight = 0",
        "cpu-weight = 10001",
        "memory-max = 1.5G",
    ):
        with pytest.raises(cgroup.LimitsError, match=bad.split(" = ")[0]):
            cgroup.parse_limits(f"[s]\n{bad}\n", "cgroup.conf")


class UnitDaemon(Daemon):
    """`busutil.Daemon` started the way systemd starts a unit with Delegate=yes: in the unit's
    own cgroup, marked delegated with the ``trusted.delegate`` xattr, nothing else in it."""

    def __init__(self, bus: PrivateBus, tree: Tree, unit: str, *args: str) -> None:
        wrapper = ["/bin/sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', unit]
        super().__init__(bus, tree, *args, wrapper=wrapper)


@pytest.fixture
def unit_cgroup() -> Iterator[str]:
    """A cgroup as systemd makes one for a unit with Delegate=yes."""
    mount = mount_or_skip()
    if os.geteuid() != 0:
        pytest.skip("needs root: makes a cgroup at the top of the cgroup v2 hierarchy")
    path = os.path.join(mount, f"vhostuserd-test-{os.getpid()}.service")
    os.mkdir(path)
    try:
        os.setxattr(path, "trusted.delegate", b"1")
    except OSError as e:
        os.rmdir(path)
        pytest.skip(f"cannot mark a cgroup delegated here (trusted.delegate: {e.strerror})")
    yield path
    for _ in range(2):  # whatever a failing test left: killed, then every cgroup removed
        for sub in sorted(
            (
                os.path.join(path, n)
                for n in os.listdir(path)
                if os.path.isdir(os.path.join(path, n))
            ),
            reverse=True,
        ):
            cgroup.Cgroups.kill(cgroup.Cgroups(), sub)
    wait_for(lambda: not cgroup.Cgroups.populated(path), f"{path} empty")
    for n in os.listdir(path):
        if os.path.isdir(os.path.join(path, n)):
            os.rmdir(os.path.join(path, n))
    os.rmdir(path)


def test_in_a_delegated_unit_cgroup_the_daemon_is_in_daemon_and_backends_beside_it_across_restart(
    bus: PrivateBus, tree: Tree, unit_cgroup: str
) -> None:
    import json

    from busutil import ctl

    fake = install(tree, "daemonizes", short="daemon", ignore_sigterm=True)
    unit = "/" + os.path.relpath(unit_cgroup, mount_or_skip())
    first = UnitDaemon(bus, tree, unit_cgroup, "--grace-period", str(GRACE))
    try:
        assert in_cgroup(first.proc.pid) == f"{unit}/daemon"
        status = json.loads(ctl(bus, tree, "--json", "status").stdout)
        assert status["cgroups"] == f"delegated: {unit} (controllers: none)" or status[
            "cgroups"
        ].startswith(f"delegated: {unit} (controllers: "), status

        async def spawn_one() -> tuple[str, dict[str, Any], int]:
            c = await Client.open(bus.address, record=False)
            path, props = await spawn(c, fake, tree.root, {"detach": True})
            grandchild = fake.report(props["Pid"])["grandchild"]
            await c.close()
            return path, props, grandchild

        path, props, grandchild = run(spawn_one())
        assert (
            props["Cgroup"]
            == in_cgroup(props["Pid"])
            == in_cgroup(grandchild)
            == f"{unit}/backend-{props['Id']}"
        )
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    finally:
        if first.proc.poll() is None:
            first.stop(signal.SIGKILL)
    # systemd starts the next instance in the unit's cgroup again; daemon/ is still there.
    second = UnitDaemon(bus, tree, unit_cgroup, "--grace-period", str(GRACE))
    try:
        assert in_cgroup(second.proc.pid) == f"{unit}/daemon"

        async def stop_it() -> None:
            c = await Client.open(bus.address, record=False)
            again = await c.backend(path)
            assert again["Cgroup"] == props["Cgroup"]
            await c.stop(path)
            await c.close()

        run(stop_it())
        where = os.path.join(unit_cgroup, f"backend-{props['Id']}")
        wait_for(
            lambda: backend_left_nothing(where, [props["Pid"], grandchild]),
            "the re-adopted backend's cgroup gone",
        )
        assert sorted(
            os.path.basename(p)
            for p in os.listdir(unit_cgroup)
            if os.path.isdir(os.path.join(unit_cgroup, p))
        ) == ["daemon"]
    finally:
        second.stop()


def test_vhostuserctl_backends_shows_cpu_memory_and_tasks_columns_and_json_keys(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    import json

    from busutil import ctl

    busy = install(tree, "daemonizes", short="busy", burn_s=0.3)
    start_daemon()

    async def main() -> None:
        c = await Client.open(bus.address)
        path, props = await spawn(c, busy, tree.root)
        cgroup_dir(props)
        busy.report(props["Pid"])
        text = ctl(bus, tree, "backends")
        assert text.returncode == 0, text.stderr
        header, *rows = text.stdout.splitlines()
        assert header.split()[6:9] == ["CPU", "MEMORY", "TASKS"], header
        (row,) = [r for r in rows if r.split()[0] == props["Id"]]
        cpu, mem, tasks = row.split()[6:9]
        assert cpu.endswith(("ms", "s")) and cpu != "-", row  # 0.3 s burned: e.g. "312ms"
        (doc,) = [
            b
            for b in json.loads(ctl(bus, tree, "--json", "backends").stdout)
            if b["object"] == path
        ]
        assert doc["cgroup"] == props["Cgroup"] and doc["cpu_usec"] >= 300_000, doc
        for key, cell in (("memory_current", mem), ("tasks", tasks)):
            assert (doc[key] is None) == (cell == "-"), (key, doc[key], cell)  # null, never -1
        await c.stop(path)
        await c.close()

    run(main())
