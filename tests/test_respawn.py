"""Respawn, opt-in and bounded (issue 15 item 3): the admin's ``respawn = N T`` in
SYSCONFDIR/vhostuserd/options.conf. A listening backend (tests/fake_backends/checks_socket.py:
accepts one front-end on fd 3 and greets it) killed with SIGKILL comes back on the same
listening socket, where a new front-end connects and is greeted by the new process; the
`Restarts` property counts and a `Respawned` signal says each; after N restarts in T seconds
the next exit is final, `Exited` comes and GetLog says why. A Stop is never undone, and a
connected-socket backend is never respawned. The limit parsing is pure (tests/test_extras.py
style, here too)."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from busutil import Daemon, PrivateBus, Tree, await_for, run
from helpers_spawn import Client, connected_pair, install, kill_marked, listening

from vhostuserd.core import extras

StartDaemon = Callable[..., Daemon]


@pytest.fixture(autouse=True)
def no_leftovers(tree: Tree) -> Iterator[None]:
    yield
    kill_marked(tree)


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("2 60", (2, 60)),
        ("10 10", (10, 10)),
        ("0 10", None),
        ("101 10", None),
        ("3", None),
        ("3 0", None),
        ("3 3601", None),
        ("x 10", None),
        ("-1 10", None),
    ],
)
def test_respawn_limit_is_n_restarts_in_t_seconds(value: str, ok: tuple[int, int] | None) -> None:
    text = f"[50-x.json]\nrespawn = {value}\n"
    if ok is None:
        with pytest.raises(extras.ExtrasError, match=r"\[50-x.json\] respawn = .*: N T"):
            extras.parse_config(text, "options.conf")
    else:
        config = extras.parse_config(text, "options.conf")
        assert extras.extras_for("block", "50-x.json", config).respawn == ok


def _conf(tree: Tree, text: str) -> None:
    d = tree.sysconfdir / "vhostuserd"
    d.mkdir(parents=True, exist_ok=True)
    (d / "options.conf").write_text(text)


def greet(path: Path) -> bytes:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect(str(path))
        return s.recv(100)
    finally:
        s.close()


def test_a_killed_listening_backend_comes_back_on_its_socket_until_the_limit(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    fake = install(tree, "checks_socket", "block", [], short="blk")
    _conf(tree, f"[{fake.name}]\nrespawn = 2 600\n")
    start_daemon()
    sock = tree.root / "blk.sock"

    async def main() -> None:
        c = await Client.open(bus.address)
        listener = listening(sock)
        inode = os.fstat(listener.fileno()).st_ino
        try:
            path = await c.spawn(fake.name, listener.fileno())
        finally:
            listener.close()
        props = await c.backend(path)
        pids = [props["Pid"]]
        assert greet(sock) == f"hello from backend {pids[0]}\n".encode()
        inodes = [fake.report(pids[0])["got"]["inode"]]  # written once it greeted
        for n in (1, 2):
            mark = len(c.signals)
            os.kill(pids[-1], signal.SIGKILL)
            await await_for(lambda m=mark: c.since(m, "Respawned", path), f"respawn {n}")
            props = await c.backend(path)
            assert props["Restarts"] == n and props["State"] == "running", props
            assert props["Id"] == path.rsplit("/", 1)[1], "the same object, the same id"
            assert props["Pid"] not in pids
            pids.append(props["Pid"])
            assert c.since(mark, "Respawned", path)[0].body == [n]
            assert not c.since(mark, "Exited", path), "a respawn is no exit"
            # The same listening socket: a new front-end reaches the new process.
            assert greet(sock) == f"hello from backend {pids[-1]}\n".encode()
            inodes.append(fake.report(pids[-1])["got"]["inode"])
        # Each of the three processes got the caller's one listening socket as its fd 3.
        assert inodes == [inode] * 3
        mark = len(c.signals)
        os.kill(pids[-1], signal.SIGKILL)
        await await_for(lambda: c.since(mark, "Exited", path), "the final exit")
        assert c.since(mark, "Exited", path)[0].body == [-1, signal.SIGKILL]
        assert not c.since(mark, "Respawned", path)
        log = await c.get_log(path)
        assert "respawn limit reached (2 restarts in 600 s): not restarting" in log, log
        await c.close()

    run(main())


def test_stop_is_final_and_connected_backends_are_never_respawned(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    blk = install(tree, "checks_socket", "block", [], short="blk")
    gpu = install(tree, "checks_socket", "gpu", [], short="gpu")
    _conf(tree, "[type:block]\nrespawn = 5 60\n[type:gpu]\nrespawn = 5 60\n")
    start_daemon()

    async def main() -> None:
        c = await Client.open(bus.address)
        listener = listening(tree.root / "b.sock")
        try:
            path = await c.spawn(blk.name, listener.fileno())
        finally:
            listener.close()
        mark = len(c.signals)
        await c.stop(path)
        await await_for(lambda: c.since(mark, "Exited", path), "its exit")
        assert not c.since(mark, "Respawned", path)
        ours, theirs = connected_pair()
        try:
            gpath = await c.spawn(gpu.name, theirs.fileno())
        finally:
            theirs.close()
        pid = (await c.backend(gpath))["Pid"]
        mark = len(c.signals)
        os.kill(pid, signal.SIGKILL)
        await await_for(lambda: c.since(mark, "Exited", gpath), "the gpu backend's exit")
        assert not c.since(mark, "Respawned", gpath)
        ours.close()
        await c.close()

    run(main())
