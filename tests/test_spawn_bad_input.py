"""Spawn with bad input (docs/contract.md section 3: Spawn, its options, its socket, Errors).

Each bad request fails with the named error and a message saying what is wrong, starts no
process, and costs the daemon nothing: one daemon serves every test of this module, and
after each of them its open-fd count is back at the baseline taken after a warm-up
Spawn/Stop cycle (so that fds opened lazily, once, are not counted).

The rules themselves are tested case by case without a bus: every option Spawn refuses in
tests/test_spawn_options_rules.py, every socket and its kind in tests/test_policy.py (on real
fds too), the names it does not find in tests/test_lookup_rules.py (rule 1); here one case of
each proves that the daemon applies the rule, replies with its D-Bus error and message, and
stays as it was.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from busutil import Daemon, PrivateBus, Tree, run, wait_for
from dbus_fast import Variant
from helpers_spawn import (
    ERROR,
    Client,
    Fake,
    connected_pair,
    error_of,
    fds_of,
    install,
    kill_marked,
    marked,
    settle_fd_count,
    spawn,
)

from vhostuserd.client import QuotaExceeded


@dataclass
class Env:
    daemon: Daemon
    tree: Tree
    fakes: dict[str, Fake]
    baseline: int


@pytest.fixture(scope="module")
def module_env(bus: PrivateBus, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tree = Tree.make(tmp_path_factory.mktemp("bad-input"))
    fakes = {
        "gpu": install(tree, "honours_sigterm", "gpu", ["virgl", "vendor-thing"], short="gpu"),
        "fs": install(tree, "honours_sigterm", "fs", [], short="fs"),
        "input": install(
            tree, "honours_sigterm", "input", ["evdev-path", "no-grab"], short="input"
        ),
    }
    d = Daemon(bus, tree, "--grace-period", "1")
    wait_for(lambda: "watching " in d.log(), "the daemon to watch its directories")

    async def warm_up() -> None:
        c = await Client.open(bus.address, record=False)
        for fake in fakes.values():
            await c.capabilities(fake.name)
        path, _props = await spawn(c, fakes["gpu"], tree.root, {"virgl": True})
        await c.stop(path)
        await c.close()

    run(warm_up())
    # Stable: the same count twice, 200 ms apart.
    counts = [d.fd_count()]

    def stable() -> bool:
        time.sleep(0.2)
        counts.append(d.fd_count())
        return counts[-1] == counts[-2]

    wait_for(stable, "a stable fd count after the warm-up")
    yield Env(d, tree, fakes, counts[-1])
    kill_marked(tree)
    d.stop()


@pytest.fixture
def env(module_env: Env) -> Iterator[Env]:
    """The module's daemon. After the test: no process started, the daemon alive with its
    fd count unchanged. A failure resets the baseline, so that one leak is reported once,
    by its own test."""
    env = module_env
    yield env
    assert env.daemon.proc.poll() is None, env.daemon.log()[-4000:]
    try:
        assert marked(env.tree) == [], "a bad Spawn must start nothing"
        settle_fd_count(env.daemon, env.baseline, timeout=2.0)
    finally:
        kill_marked(env.tree)
        env.baseline = env.daemon.fd_count()


def bad_spawn(
    address: str, name: str, options: dict[str, Variant], fds: list[int], index: int = 0
) -> tuple[str, str]:
    """(error name, message) of a Spawn that must fail."""

    async def main() -> tuple[str, str]:
        c = await Client.open(address, record=False)
        try:
            return error_of(await c.raw_spawn(name, options, fds, index))
        finally:
            await c.close()

    return run(main())


def with_pair(env: Env, bus: PrivateBus, name: str, options: dict[str, Variant]) -> tuple[str, str]:
    ours, theirs = connected_pair()
    try:
        return bad_spawn(bus.address, name, options, [theirs.fileno()])
    finally:
        ours.close()
        theirs.close()


# ---------------------------------------------------------------- the socket


def test_a_pipe_is_invalid_socket(env: Env, bus: PrivateBus) -> None:
    r, w = os.pipe()
    try:
        for fd in (r, w):
            name, message = bad_spawn(bus.address, env.fakes["gpu"].name, {}, [fd])
            assert name == ERROR + "InvalidSocket"
            assert "pipe" in message and "AF_UNIX SOCK_STREAM" in message, message
    finally:
        os.close(r)
        os.close(w)


def test_an_fd_index_beyond_the_fds_sent_is_invalid_socket(env: Env, bus: PrivateBus) -> None:
    ours, theirs = connected_pair()
    with ours, theirs:
        for index in (1, 2**31 - 1, 2**32 - 1):
            name, message = bad_spawn(
                bus.address, env.fakes["gpu"].name, {}, [theirs.fileno()], index
            )
            assert name == ERROR + "InvalidSocket", (index, name, message)


def test_an_fd_index_with_no_fd_sent_never_touches_the_daemons_own_fds(
    env: Env, bus: PrivateBus
) -> None:
    """Spawn's 'h' is an index into the fds the call carries. Without any, the daemon must
    not read the index as an fd number of its own: each of its fds (its bus connection, a
    connected AF_UNIX socket, included) would be checked, handed to the backend and closed."""
    own = fds_of(env.daemon.proc.pid)
    for index in sorted(own):
        name, message = bad_spawn(bus.address, env.fakes["gpu"].name, {}, [], index)
        assert name == ERROR + "InvalidSocket", (index, own[index], name, message)
        assert fds_of(env.daemon.proc.pid) == own, (
            f"index {index} ({own[index]}) touched the daemon's fds"
        )


def test_extra_fds_beyond_the_one_named_are_closed(env: Env, bus: PrivateBus) -> None:
    # Valid call, with two more fds than it names: the backend runs, the extras are not kept.
    ours, theirs = connected_pair()
    x, y = socket.socketpair()
    with ours, theirs, x, y:

        async def main() -> None:
            c = await Client.open(bus.address, record=False)
            reply = await c.raw_spawn(
                env.fakes["gpu"].name, {}, [x.fileno(), theirs.fileno(), y.fileno()], 1
            )
            assert reply.error_name is None, reply.body
            path = reply.body[0]
            props = await c.backend(path)
            assert (
                os.readlink(f"/proc/{props['Pid']}/fd/3")
                == f"socket:[{os.fstat(theirs.fileno()).st_ino}]"
            )
            await c.stop(path)
            await c.close()

        run(main())


def test_a_connected_socket_for_an_fs_backend_says_it_needs_a_listening_one(
    env: Env, bus: PrivateBus
) -> None:
    name, message = with_pair(env, bus, env.fakes["fs"].name, {})
    assert name == ERROR + "InvalidSocket"
    assert "needs a listening socket" in message and env.fakes["fs"].name in message, message


# ---------------------------------------------------------------- the options


def test_an_unknown_option_is_invalid_option_naming_it(env: Env, bus: PrivateBus) -> None:
    name, message = with_pair(env, bus, env.fakes["gpu"].name, {"turbo": Variant("b", True)})
    assert name == ERROR + "InvalidOption"
    assert "'turbo'" in message and "unknown option" in message, message
    # It says what this backend accepts.
    assert "virgl" in message and "detach" in message, message


def test_the_d_bus_type_of_an_option_reaches_the_option_rules(env: Env, bus: PrivateBus) -> None:
    # 100 is an integer either way: only the variant's signature says it is not a 'u'.
    name, message = with_pair(env, bus, env.fakes["gpu"].name, {"settle-ms": Variant("i", 100)})
    assert name == ERROR + "InvalidOption"
    assert "'settle-ms'" in message and "'u'" in message and "'i'" in message, message


def test_bad_calls_leave_the_fd_count_at_the_baseline(env: Env, bus: PrivateBus) -> None:
    """The sum of all of them, run here once more, in a burst."""
    for _ in range(20):
        test_a_pipe_is_invalid_socket(env, bus)
        test_an_unknown_option_is_invalid_option_naming_it(env, bus)
        test_a_connected_socket_for_an_fs_backend_says_it_needs_a_listening_one(env, bus)
        test_an_fd_index_beyond_the_fds_sent_is_invalid_socket(env, bus)
    settle_fd_count(env.daemon, env.baseline)


# ---------------------------------------------------------------- quotas (their own daemons)


@pytest.fixture
def own_bus() -> Iterator[PrivateBus]:
    """A bus of its own: the module's daemon owns the name on the shared one."""
    b = PrivateBus()
    yield b
    b.close()


def test_quota_of_the_daemon(own_bus: PrivateBus, tree: Tree) -> None:
    bus = own_bus
    fake = install(tree, "honours_sigterm", "gpu", [], short="gpu")
    d = Daemon(bus, tree, "--max-backends", "2")

    async def main() -> None:
        c = await Client.open(bus.address, record=False)
        paths = [(await spawn(c, fake, tree.root))[0] for _ in range(2)]
        with pytest.raises(QuotaExceeded) as e:
            await spawn(c, fake, tree.root)
        assert "2 backends" in str(e.value), str(e.value)
        assert len(marked(tree)) == 2
        for p in paths:
            await c.stop(p)
        await c.close()

    try:
        run(main())
    finally:
        kill_marked(tree)
        d.stop()
