"""Spawn and supervision against the real daemon on a real private bus (docs/contract.md section 3:
Spawn, the Backend object, Stop, GetLog, Exited; section 2: --grace-period, --state-dir).

Every backend is a fake from tests/fake_backends/ installed into the test's tree; what the
child really got (argv, fd 3, stdin, cwd, session, environment, signal dispositions) is
read from /proc or from the report the fake writes, never taken from the daemon's word.

The supervisor's own rules (SIGKILL to the whole group at the grace period, the last 64 KiB
of output kept, ids never reused across restarts, a settle time of 0 not waiting) are tested
on it alone in tests/test_supervisor.py; here, that the daemon's calls and signals reach them.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable, Iterator

import pytest
from busutil import MANAGER_PATH, Daemon, PrivateBus, Tree, await_for, run, wait_for
from dbus_fast import Variant
from helpers_spawn import (
    ERROR,
    OM_IFACE,
    Client,
    Timer,
    connected_pair,
    environ_of,
    fds_of,
    gone,
    install,
    kill_marked,
    listening,
    proc_stat,
    signal_masks,
    spawn,
    wait_none_marked,
)

from vhostuserd.client import SpawnFailed
from vhostuserd.core import options as spawn_options
from vhostuserd.core.descriptors import Capabilities, Descriptor
from vhostuserd.core.names import BACKEND_IFACE

StartDaemon = Callable[..., Daemon]


@pytest.fixture(autouse=True)
def no_leftovers(tree: Tree) -> Iterator[None]:
    """Whatever a failing test left running is killed, so it cannot disturb the next."""
    yield
    kill_marked(tree)


def sock_inode(s: socket.socket) -> int:
    return os.fstat(s.fileno()).st_ino


# ---------------------------------------------------------------- what Spawn returns


def test_spawn_returns_a_backend_object_whose_properties_describe_the_child(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    fake = install(tree, "checks_socket", "gpu", ["render-node", "virgl"], short="gpu")
    start_daemon()

    async def main() -> None:
        c = await Client.open(bus.address)
        ours, theirs = connected_pair()
        inode = sock_inode(theirs)
        before = time.time_ns() // 1000
        try:
            path = await c.spawn(fake.name, theirs.fileno(), {"virgl": True})
        finally:
            theirs.close()
        after = time.time_ns() // 1000
        props = await c.backend(path)
        pid = props["Pid"]
        assert path == f"{MANAGER_PATH}/backend/{props['Id']}"
        assert props["Descriptor"] == fake.name
        assert props["Binary"] == str(fake.path)
        assert props["Argv"] == [str(fake.path), "--fd=3", "--virgl"]
        assert props["OwnerUid"] == os.getuid()
        assert props["Owner"] == c.unique_name
        assert (props["State"], props["ExitStatus"], props["ExitSignal"]) == ("running", -1, -1)
        assert before <= props["StartedAt"] <= after
        assert props["Detached"] is False

        # The pid is the child itself, which got exactly that argv and our socket as fd 3,
        # connected: it can greet us through the other end of our pair.
        report = fake.report(pid)
        assert report["argv"] == props["Argv"][1:]
        got = report["got"]
        assert (got["fd"], got["inode"], got["family"], got["type"], got["listening"]) == (
            3,
            inode,
            socket.AF_UNIX,
            socket.SOCK_STREAM,
            False,
        ), got
        ours.settimeout(5)
        assert ours.recv(100) == f"hello from backend {pid}\n".encode()
        assert got["greeted"] is True

        # ListBackends says the same, with the keys of the D-Bus dict of docs/contract.md section 3.
        (listed,) = [b for b in await c.list_backends() if b["object"] == path]
        assert listed == {
            "id": props["Id"],
            "descriptor": fake.name,
            "binary": str(fake.path),
            "argv": props["Argv"],
            "pid": pid,
            "owner_uid": os.getuid(),
            "owner": c.unique_name,
            "state": "running",
            "exit_status": -1,
            "exit_signal": -1,
            "started_at": props["StartedAt"],
            "detached": False,
            "object": path,
            "cgroup": props["Cgroup"],
            "cpu_usec": listed["cpu_usec"],
            "memory_current": props["MemoryCurrent"],
            "memory_peak": listed["memory_peak"],
            "tasks": props["Tasks"],
        }
        assert listed["cpu_usec"] >= (
            0 if props["Cgroup"] else -1
        )  # tests/test_supervisor.py checks the numbers
        # The object was announced on the manager's path (ObjectManager), properties and all.
        added = [m for m in c.since(0, "InterfacesAdded", MANAGER_PATH) if m.body[0] == path]
        assert len(added) == 1 and added[0].interface == OM_IFACE
        announced = {k: v.value for k, v in added[0].body[1][BACKEND_IFACE].items()}
        volatile = {"CpuUsec", "MemoryCurrent", "MemoryPeak", "Tasks"}  # measured when read
        assert set(announced) == set(props)
        assert {k: v for k, v in announced.items() if k not in volatile} == {
            k: v for k, v in props.items() if k not in volatile
        }

        await c.stop(path)
        assert gone(pid)
        ours.close()
        await c.close()

    run(main())


def test_fs_backend_gets_a_listening_socket_and_shared_dir_in_the_form_its_probe_asks_for(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    separate = install(tree, "checks_socket", "fs", ["separate-options", "migrate"], short="fs-sep")
    classic = install(tree, "checks_socket", "fs", None, short="fs-o")
    shared = tree.root / "shared dir"
    shared.mkdir()
    start_daemon()

    async def main() -> None:
        c = await Client.open(bus.address)
        for fake, want in (
            (separate, [f"--shared-dir={shared}"]),
            (classic, ["-o", f"source={shared}"]),
        ):
            sock_path = tree.root / f"{fake.path.name}.sock"
            listener = listening(sock_path)
            inode = sock_inode(listener)
            try:
                path = await c.spawn(
                    fake.name, listener.fileno(), {"shared-dir": str(shared), "detach": True}
                )
            finally:
                listener.close()
            props = await c.backend(path)
            assert props["Argv"] == [str(fake.path), "--fd=3", *want]
            assert props["Detached"] is True
            # The backend accepts a front-end on the socket we bound: we connect to it by path.
            front = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            front.settimeout(5)
            front.connect(str(sock_path))
            assert front.recv(100) == f"hello from backend {props['Pid']}\n".encode()
            front.close()
            got = fake.report(props["Pid"])["got"]
            assert (got["inode"], got["listening"], got["accepted"]) == (inode, True, True), got
            await c.stop(path)
            assert gone(props["Pid"])
        await c.close()

    run(main())


def test_options_map_to_backend_flags() -> None:
    """The option → argv mapping itself (options.plan), for the device options this machine
    may lack: render-node, evdev-path, blk-file and the boolean flags."""

    def argv(
        btype: str, features: tuple[str, ...], opts: dict[str, tuple[str, object]]
    ) -> list[str]:
        d = Descriptor("50-x.json", "/x/50-x.json", "data", btype, "x", "/usr/libexec/x")
        return list(spawn_options.plan(d, Capabilities(btype, features, "{}"), opts).argv)

    assert argv(
        "gpu",
        ("render-node", "virgl"),
        {"render-node": ("s", "/dev/dri/renderD128"), "virgl": ("b", True)},
    ) == ["/usr/libexec/x", "--fd=3", "--render-node=/dev/dri/renderD128", "--virgl"]
    assert argv("gpu", ("virgl",), {"virgl": ("b", False)}) == ["/usr/libexec/x", "--fd=3"]
    assert argv(
        "input",
        ("evdev-path", "no-grab"),
        {"evdev-path": ("s", "/dev/input/event3"), "no-grab": ("b", True)},
    ) == ["/usr/libexec/x", "--fd=3", "--evdev-path=/dev/input/event3", "--no-grab"]
    assert argv(
        "block",
        ("blk-file", "read-only"),
        {"blk-file": ("s", "/srv/disk.img"), "read-only": ("b", True)},
    ) == ["/usr/libexec/x", "--fd=3", "--blk-file=/srv/disk.img", "--read-only"]


def test_render_node_reaches_the_backend_as_its_flag(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    nodes = sorted(glob.glob("/dev/dri/renderD*"))
    if not nodes:
        pytest.skip(
            "no /dev/dri/renderD* on this machine: render-node must name a real render node"
        )
    fake = install(tree, "honours_sigterm", "gpu", ["render-node", "virgl"], short="gpu")
    start_daemon()

    async def main() -> None:
        c = await Client.open(bus.address)
        path, props = await spawn(c, fake, tree.root, {"render-node": nodes[0], "virgl": True})
        assert props["Argv"] == [str(fake.path), "--fd=3", f"--render-node={nodes[0]}", "--virgl"]
        assert fake.report(props["Pid"])["argv"] == props["Argv"][1:]
        await c.stop(path)
        await c.close()

    run(main())


# ---------------------------------------------------------------- the child's surroundings


def test_child_gets_only_its_socket_null_stdin_root_cwd_own_session_and_minimal_env(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    # A shell that execs sleep(1): no interpreter of ours touches fds, env or signals.
    fake = install(tree, "execs_sleep", "gpu", [], short="sleep")
    python = install(tree, "honours_sigterm", "gpu", [], short="python")
    sleep = os.path.realpath(shutil.which("sleep") or "/bin/sleep")
    d = start_daemon()

    async def main() -> None:
        c = await Client.open(bus.address)
        ours, theirs = connected_pair()
        inode = sock_inode(theirs)
        try:
            path = await c.spawn(fake.name, theirs.fileno())
        finally:
            theirs.close()
        pid = (await c.backend(path))["Pid"]
        python_path, python_props = await spawn(c, python, tree.root)
        python_pid = python_props["Pid"]
        python.report(python_pid)
        wait_for(lambda: os.path.realpath(f"/proc/{pid}/exe") == sleep, "the backend to exec sleep")

        fds = fds_of(pid)
        assert sorted(fds) == [0, 1, 2, 3], fds
        assert fds[0] == "/dev/null"
        assert fds[1] == fds[2] and fds[1].startswith("pipe:"), fds
        assert fds[3] == f"socket:[{inode}]"
        with open(f"/proc/{pid}/fdinfo/0") as f:  # noqa: ASYNC230 - procfs: it never blocks
            flags = int(next(line for line in f if line.startswith("flags:")).split()[1], 8)
        assert flags & os.O_ACCMODE in (os.O_RDONLY, os.O_RDWR)
        assert os.readlink(f"/proc/{pid}/cwd") == "/"
        # Its own session and process group, not the daemon's.
        assert os.getsid(pid) == pid and os.getpgid(pid) == pid
        assert os.getsid(d.proc.pid) != pid
        daemon_env = environ_of(d.proc.pid)
        assert "XDG_DATA_DIRS" in daemon_env and "HOME" in daemon_env
        # The environment exec gave the interpreter (a shell adds PWD to what it passes on).
        env = environ_of(python_pid)
        assert set(env) <= {"PATH", "LC_ALL", "LANG"} and "PATH" in env, env
        # Signals: nothing blocked; nothing ignored but SIGPIPE (documented in procs.spawn:
        # a backend writing its log while the daemon restarts gets EPIPE, not death). Python
        # itself ignores SIGPIPE and SIGXFSZ; SIGXFSZ is reset. glibc's posix_spawn leaves
        # its two internal signals (32, 33: SIGCANCEL, SIGSETXID) ignored in every child;
        # glibc programs cannot see them, so they are no choice of the daemon's.
        masks = signal_masks(pid)
        assert masks["SigBlk"] == 0, masks
        allowed = (1 << (signal.SIGPIPE - 1)) | (1 << 31) | (1 << 32)
        assert masks["SigIgn"] & ~allowed == 0, [
            n + 1 for n in range(64) if masks["SigIgn"] >> n & 1
        ]

        await c.stop(path)
        await c.stop(python_path)
        assert gone(pid) and gone(python_pid)
        ours.close()
        await c.close()

    run(main())


# ---------------------------------------------------------------- Stop


def test_stop_of_a_backend_that_honours_sigterm_returns_once_it_is_gone(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    fake = install(tree, "honours_sigterm", "gpu", [], short="term")
    start_daemon("--grace-period", "5")

    async def main() -> None:
        c = await Client.open(bus.address)
        path, props = await spawn(c, fake, tree.root)
        pid = props["Pid"]
        fake.report(pid)
        t = Timer()
        await c.stop(path)
        # Gone means reaped: not even a zombie is left when Stop returns.
        assert gone(pid), proc_stat(pid)
        # SIGTERM did it: no waiting for the 5 s grace period.
        assert t.elapsed < 2.5, t.elapsed
        after = await c.backend(path)
        assert (after["State"], after["ExitStatus"], after["ExitSignal"]) == (
            "exited",
            -1,
            signal.SIGTERM,
        )
        await await_for(lambda: c.since(0, "Exited", path), "Exited")
        assert [m.body for m in c.since(0, "Exited", path)] == [[-1, signal.SIGTERM]]
        # A second Stop of an exited backend is harmless.
        await c.stop(path)
        await c.close()

    run(main())


# ---------------------------------------------------------------- exits


def test_a_crashing_backend_emits_exited_once_and_its_object_goes_after_a_short_linger(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    by_status = install(
        tree, "forks_grandchild", "gpu", [], short="crash7", exit_after=0.5, status=7
    )
    by_signal = install(
        tree, "exits", "gpu", [], short="crashsig", delay=0.5, signal=int(signal.SIGUSR1)
    )
    start_daemon()

    async def main() -> None:
        c = await Client.open(bus.address)
        # settle-ms 0: these die later, whatever the machine's load; Spawn must not see it.
        path7, props7 = await spawn(c, by_status, tree.root, {"settle-ms": 0})
        grandchild = by_status.report(props7["Pid"])["grandchild"]
        path_sig, props_sig = await spawn(c, by_signal, tree.root, {"settle-ms": 0})
        expect = {path7: [7, -1], path_sig: [-1, int(signal.SIGUSR1)]}
        for path in expect:
            await await_for(lambda p=path: c.since(0, "Exited", p), f"Exited of {path}")
        exited_at = time.monotonic()
        for path, body in expect.items():
            # Still there for a moment, saying how it ended; its process reaped.
            after = await c.backend(path)
            assert (after["State"], [after["ExitStatus"], after["ExitSignal"]]) == ("exited", body)
        assert gone(props7["Pid"]) and gone(props_sig["Pid"])
        # A backend takes the helpers of its group with it.
        wait_for(lambda: gone(grandchild), "the crashed backend's grandchild to be gone", 2.0)

        def removed(path: str) -> bool:
            return any(
                m.body[0] == path and m.interface == OM_IFACE
                for m in c.since(0, "InterfacesRemoved", MANAGER_PATH)
            )

        await await_for(lambda: all(removed(p) for p in expect), "InterfacesRemoved of both", 8)
        linger = time.monotonic() - exited_at
        assert 0.5 < linger < 8, linger
        listed = [b["object"] for b in await c.list_backends()]
        for path, body in expect.items():
            assert path not in listed
            assert [m.body for m in c.since(0, "Exited", path)] == [body], (
                "Exited must come exactly once"
            )
            props_changes = [
                m
                for m in c.since(0, "PropertiesChanged", path)
                if m.body[1].get("State", Variant("s", "")).value == "exited"
            ]
            assert len(props_changes) == 1
        wait_none_marked(tree, 2.0)
        await c.close()

    run(main())


def test_an_early_exit_within_settle_time_is_spawn_failed_with_status_and_stderr_tail(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    message = "fake backend: cannot open /var/lib/nothing: No such file or directory"
    fake = install(tree, "exits", "gpu", [], short="dies", status=1, lines=200, message=message)
    late = install(tree, "exits", "gpu", [], short="dieslate", status=4, delay=0.4)
    start_daemon()

    async def main() -> None:
        c = await Client.open(bus.address)
        # At once with the default settle time, and after 0.4 s within settle-ms 2000.
        for fk, opts, status, says in (
            (fake, {}, 1, message),
            (late, {"settle-ms": 2000}, 4, "giving up"),
        ):
            s = connected_pair()[1]
            try:
                with pytest.raises(SpawnFailed) as e:
                    await c.spawn(fk.name, s.fileno(), opts)
            finally:
                s.close()
            text = str(e.value)
            assert e.value.name == ERROR + "SpawnFailed"
            assert fk.name in text and f"exited with status {status}" in text, text
            assert says in text, text
            if fk is fake:
                # The tail of its output: the last lines, not the first.
                assert "early line 199" in text and "early line 0\n" not in text, text
        # Nothing stays behind: no object, no process.
        assert await c.list_backends() == []
        wait_none_marked(tree, 2.0)
        await c.close()

    run(main())


def test_exec_failure_is_spawn_failed_naming_the_binary(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    missing = install(tree, "honours_sigterm", "gpu", [], short="missing")
    noexec = install(tree, "honours_sigterm", "gpu", [], short="noexec")
    d = start_daemon()

    async def main() -> None:
        c = await Client.open(bus.address)
        # Found and probed while it was there; then it goes (or loses its x bit).
        for fk in (missing, noexec):
            await c.capabilities(fk.name)
        missing.path.unlink()
        noexec.path.chmod(0o644)
        for fk, why in ((missing, "No such file or directory"), (noexec, "Permission denied")):
            s = connected_pair()[1]
            try:
                with pytest.raises(SpawnFailed) as e:
                    await c.spawn(fk.name, s.fileno())
            finally:
                s.close()
            assert str(fk.path) in str(e.value) and why in str(e.value), str(e.value)
        assert await c.list_backends() == []
        await c.close()

    run(main())
    assert d.proc.poll() is None
