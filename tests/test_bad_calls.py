"""Bad calls get typed errors and cost the daemon nothing (docs/contract.md section 3, Errors).

Requests that cannot be served fail with org.vhostuserd.Broker1.Error.* names and
messages that say why; malformed calls fail with the standard D-Bus errors; and fds
attached to calls (or signals) that do not take them are closed, not leaked: the
daemon's open-fd count is the same after 1,000 of them. What Resolve's messages say is
resolve's rule (tests/test_lookup_rules.py, rule 5), which names are found is Index.get's
(tests/test_lookup_rules.py, rule 1); here the daemon replies with them.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

from busutil import (
    BUS_NAME,
    MANAGER_PATH,
    Daemon,
    PrivateBus,
    Tree,
    await_for,
    descriptor,
    fake_backend,
    run,
)
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from helpers_live import ERROR_PREFIX, MANAGER_IFACE, PROPS_IFACE, Listener, listen

from vhostuserd.bus.manager import descriptor_path

StartDaemon = Callable[..., Daemon]

BAD_ARGS = {"org.freedesktop.DBus.Error.UnknownMethod", "org.freedesktop.DBus.Error.InvalidArgs"}


async def error_of(
    L: Listener, member: str, signature: str = "", body: list[Any] | None = None, **kw: Any
) -> tuple[str, str]:
    reply = await L.raw(member, signature, body or [], **kw)
    assert reply.message_type is MessageType.ERROR, (member, signature, reply.body)
    return reply.error_name or "", reply.body[0] if reply.body else ""


def test_resolve_not_found_lists_each_candidates_rejection(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    virgl = fake_backend(tree.root / "virgl", "gpu", ["virgl"])
    wrong = fake_backend(tree.root / "wrong", "input", [])
    tree.write("data", "10-virgl.json", descriptor("gpu", virgl))
    tree.write("data", "20-missing.json", descriptor("gpu", str(tree.root / "no-such-binary")))
    tree.write("data", "30-wrong-type.json", descriptor("gpu", wrong))
    tree.write("data", "40-input.json", descriptor("input", wrong))
    d = start_daemon()

    async def main() -> None:
        async with await listen(bus.address) as L:
            name, message = await error_of(L, "Resolve", "sas", ["gpu", ["render-node"]])
            assert name == ERROR_PREFIX + "NotFound"
            assert "10-virgl.json: feature missing: render-node" in message, message
            assert "20-missing.json: probe failed: missing-binary" in message, message
            assert "30-wrong-type.json: probe failed: type-mismatch" in message, message
            assert "1 descriptor(s) of other types" in message, message
            # The typed client maps the name to its exception class.
            from vhostuserd.client import BrokerClient, NotFound

            client = await BrokerClient.connect("address", bus.address)
            try:
                try:
                    await client.resolve("gpu", ["render-node"])
                except NotFound as e:
                    assert str(e) == message
                else:
                    raise AssertionError("resolve did not fail")
            finally:
                await client.close()

    run(main())
    d.assert_clean_log()


def test_get_capabilities_errors(bus: PrivateBus, tree: Tree, start_daemon: StartDaemon) -> None:
    failing = tree.root / "failing"
    failing.write_text("#!/bin/sh\necho 'it broke' >&2\nexit 3\n")
    failing.chmod(0o755)
    tree.write("data", "50-failing.json", descriptor("gpu", str(failing)))
    d = start_daemon()

    async def main() -> None:
        async with await listen(bus.address) as L:
            name, message = await error_of(L, "GetCapabilities", "s", ["nosuch.json"])
            assert name == ERROR_PREFIX + "NotFound"
            assert "nosuch.json" in message
            name, message = await error_of(L, "GetCapabilities", "s", ["50-failing.json"])
            assert name == ERROR_PREFIX + "ProbeFailed", (name, message)
            assert "50-failing.json" in message and str(failing) in message, message
            # The object reports the same failure.
            await await_for(
                lambda: L.prop(
                    "ProbeError",
                    descriptor_path("50-failing.json"),
                    "org.vhostuserd.Broker1.Descriptor",
                ),
                "ProbeError",
            )

    run(main())
    d.assert_clean_log()


def test_wrong_argument_types_are_rejected(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    tree.write("data", "50-gpu.json", descriptor("gpu"))
    d = start_daemon()
    obj = descriptor_path("50-gpu.json")

    async def main() -> None:
        async with await listen(bus.address) as L:
            for member, signature, body in [
                ("Resolve", "ss", ["gpu", "virgl"]),
                ("Resolve", "s", ["gpu"]),
                ("Resolve", "", []),
                ("ListDescriptors", "u", [1]),
                ("ListDescriptors", "ss", ["", ""]),
                ("GetCapabilities", "i", [5]),
                ("GetCapabilities", "as", [["50-gpu.json"]]),
                ("Reload", "s", ["now"]),
                ("NoSuchMethod", "", []),
            ]:
                name, _ = await error_of(L, member, signature, body)
                assert name in BAD_ARGS, (member, signature, name)
            name, _ = await error_of(L, "Get", "s", ["Generation"], interface=PROPS_IFACE)
            assert name in BAD_ARGS, name
            name, _ = await error_of(
                L, "Get", "ss", [MANAGER_IFACE, "NoSuchProperty"], interface=PROPS_IFACE
            )
            assert name.startswith("org.freedesktop.DBus.Error."), name
            name, _ = await error_of(
                L,
                "Set",
                "ssv",
                [MANAGER_IFACE, "Generation", Variant("t", 7)],
                interface=PROPS_IFACE,
            )
            assert name.startswith("org.freedesktop.DBus.Error."), name
            name, _ = await error_of(L, "Resolve", "sas", ["gpu", []], path=obj)
            assert name in BAD_ARGS | {"org.freedesktop.DBus.Error.UnknownObject"}, name
            # The daemon is unharmed and still answers properly.
            (path, _d) = await L.call("Resolve", "sas", ["gpu", []])
            assert path == obj

    run(main())
    d.assert_clean_log()


# ---------------------------------------------------------------- fds


def _fd_calls(obj: str) -> list[tuple[str, str, str, str, list[Any]]]:
    """(path, interface, member, signature, body) of calls that must not keep their fd;
    the fd is always at index 0 of unix_fds."""
    return [
        (MANAGER_PATH, MANAGER_IFACE, "NoSuchMethod", "h", [0]),
        (MANAGER_PATH, MANAGER_IFACE, "ListDescriptors", "sh", ["", 0]),
        (MANAGER_PATH, MANAGER_IFACE, "Resolve", "sash", ["gpu", [], 0]),
        # Spawn takes an fd, but not with an unknown descriptor (or when not exported).
        (MANAGER_PATH, MANAGER_IFACE, "Spawn", "sa{sv}h", ["nosuch.json", {}, 0]),
        (MANAGER_PATH, PROPS_IFACE, "Get", "ssh", [MANAGER_IFACE, "Generation", 0]),
        (obj, "org.freedesktop.DBus.Introspectable", "Introspect", "h", [0]),
        ("/no/such/object", MANAGER_IFACE, "ListDescriptors", "sh", ["", 0]),
    ]


async def _send_with_fd(
    conn: MessageBus, dest: str, call: tuple[str, str, str, str, list[Any]], signal: bool = False
) -> Message | None:
    path, interface, member, signature, body = call
    r, w = os.pipe()
    try:
        if signal:
            await conn.send(
                Message(
                    message_type=MessageType.SIGNAL,
                    destination=dest,
                    path=path,
                    interface=interface,
                    member=member,
                    signature=signature,
                    body=body,
                    unix_fds=[r],
                )
            )
            return None
        return await conn.call(
            Message(
                destination=dest,
                path=path,
                interface=interface,
                member=member,
                signature=signature,
                body=body,
                unix_fds=[r],
            )
        )
    finally:
        os.close(r)
        os.close(w)


def test_fd_carrying_bad_calls_get_errors_and_leak_no_fd(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    gpu = fake_backend(tree.root / "gpu", "gpu", ["virgl"])
    tree.write("data", "50-gpu.json", descriptor("gpu", gpu))
    d = start_daemon()
    obj = descriptor_path("50-gpu.json")
    calls = _fd_calls(obj)

    async def main() -> None:
        async with await listen(bus.address) as L:
            await await_for(
                lambda: L.prop("Probed", obj, "org.vhostuserd.Broker1.Descriptor"),
                "the probe to finish",
            )
            (unique,) = await L.dbus("GetNameOwner", "s", [BUS_NAME])
            await L.generation()
            before = d.fd_count()
            # Each kind once, looking at the reply.
            for call in calls:
                reply = await _send_with_fd(L.bus, BUS_NAME, call)
                assert reply is not None, call
                assert reply.message_type is MessageType.ERROR, (call, reply.body)
            # Then 1,000 calls, 50 at a time, plus unicast signals carrying fds.
            n = 0
            while n < 1000:
                batch = [calls[(n + k) % len(calls)] for k in range(50)]
                replies = await asyncio.gather(*(_send_with_fd(L.bus, BUS_NAME, c) for c in batch))
                assert all(r is not None and r.message_type is MessageType.ERROR for r in replies)
                await asyncio.gather(
                    *(_send_with_fd(L.bus, unique, c, signal=True) for c in batch[:10])
                )
                n += 50
            # Messages are handled in order: after this reply, every one above was handled.
            await L.generation()
            last = before

            def settled() -> bool:
                nonlocal last
                last = d.fd_count()
                return last == before

            await await_for(
                settled,
                lambda: f"the daemon's fd count to return to {before}; it is {last}",
                timeout=5,
            )
            # And it still works.
            (path, _d) = await L.call("Resolve", "sas", ["gpu", ["virgl"]])
            assert path == obj

    run(main())
    d.assert_clean_log()
