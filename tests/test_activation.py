"""D-Bus activation and idle exit without losing a call (docs/contract.md section 2,
--idle-timeout).

A private bus whose servicedir holds our activation file: the first call starts the daemon,
it exits when idle, and calls racing with that exit are all answered, by the old instance
or by a fresh activation.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from busutil import BUS_NAME, MANAGER_PATH, VHOSTUSERD, PrivateBus, Tree, descriptor, run
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

IDLE = 0.4


@pytest.fixture
def activation_bus(tree: Tree) -> Iterator[tuple[PrivateBus, Path]]:
    env = tree.env()
    log = tree.root / "activated.log"
    b = PrivateBus(env=env)
    wrapper = tree.root / "vhostuserd-activated"
    # The activation file's Exec has no shell: a wrapper keeps the daemons' logs for the test.
    wrapper.write_text(
        f"#!/bin/sh\nexec {VHOSTUSERD} --user --idle-timeout {IDLE} "
        f"--sysconfdir {tree.sysconfdir} --log-level debug 2>>{log}\n"
    )
    wrapper.chmod(0o755)
    (b.servicedir / f"{BUS_NAME}.service").write_text(
        f"[D-BUS Service]\nName={BUS_NAME}\nExec={wrapper}\n"
    )
    b.reload()
    tree.write("data", "50-gpu.json", descriptor("gpu"))
    yield b, log
    # Leave no daemon behind: it exits by itself when idle.
    deadline = time.monotonic() + 10
    while b.name_has_owner() and time.monotonic() < deadline:
        time.sleep(0.05)
    b.close()


async def _owner_pid(bus: MessageBus) -> int | None:
    r = await bus.call(
        Message(
            destination="org.freedesktop.DBus",
            path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus",
            member="GetConnectionUnixProcessID",
            signature="s",
            body=[BUS_NAME],
        )
    )
    return int(r.body[0]) if r.message_type is MessageType.METHOD_RETURN else None


async def _resolve(bus: MessageBus) -> Message:
    return await bus.call(
        Message(
            destination=BUS_NAME,
            path=MANAGER_PATH,
            interface="org.vhostuserd.Broker1.Manager",
            member="Resolve",
            signature="sas",
            body=["gpu", []],
        )
    )


def test_first_call_activates_and_daemon_exits_when_idle(activation_bus) -> None:  # type: ignore[no-untyped-def]
    b, log = activation_bus
    assert not b.name_has_owner()

    async def go() -> int | None:
        bus = await MessageBus(bus_address=b.address).connect()
        reply = await _resolve(bus)
        assert reply.message_type is MessageType.METHOD_RETURN, reply.body
        assert reply.body[1]["name"].value == "50-gpu.json"
        pid = await _owner_pid(bus)
        bus.disconnect()
        return pid

    pid = run(go())
    assert pid is not None
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not os.path.exists(f"/proc/{pid}"), "the activated daemon did not exit when idle"
    assert not b.name_has_owner()
    text = log.read_text()
    assert "releasing org.vhostuserd.Broker1" in text and "Traceback" not in text, text


def test_calls_racing_with_idle_exit_are_never_lost(activation_bus) -> None:  # type: ignore[no-untyped-def]
    b, log = activation_bus
    rng = random.Random(7)

    async def go() -> tuple[int, set[int]]:
        bus = await MessageBus(bus_address=b.address).connect()
        answered, pids = 0, set()
        for _ in range(25):
            # Land near the moment the daemon gives up its name.
            await asyncio.sleep(IDLE + rng.uniform(-0.05, 0.15))
            replies = await asyncio.gather(*(_resolve(bus) for _ in range(5)))
            for r in replies:
                assert r.message_type is MessageType.METHOD_RETURN, (r.error_name, r.body)
                answered += 1
            pid = await _owner_pid(bus)
            if pid:
                pids.add(pid)
        bus.disconnect()
        return answered, pids

    answered, pids = run(go(), timeout=120)
    assert answered == 125
    # Several instances came and went during the run: the race really was exercised.
    assert len(pids) >= 2, f"only {pids} served; idle exit never happened"
    assert "Traceback" not in log.read_text()
