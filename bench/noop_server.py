"""A dbus-fast service that does no work: the floor for vhostuserd's Resolve.

Its Resolve has the same signature as vhostuserd's and returns a precomputed reply of the
same shape, so the difference measured is vhostuserd's own work.
"""

from __future__ import annotations

import asyncio
import sys

from dbus_fast import Variant
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface, method

REPLY = [
    "/org/vhostuserd/Broker1/descriptor/_350_2dqemu_2dgpu_2ejson",
    {
        "name": Variant("s", "50-qemu-gpu.json"),
        "path": Variant("s", "/usr/share/qemu/vhost-user/50-qemu-gpu.json"),
        "tier": Variant("s", "data"),
        "type": Variant("s", "gpu"),
        "description": Variant("s", "QEMU vhost-user-gpu"),
        "binary": Variant("s", "/usr/lib/qemu/vhost-user-gpu"),
        "tags": Variant("as", []),
        "features": Variant("as", ["render-node", "virgl"]),
        "object": Variant("o", "/org/vhostuserd/Broker1/descriptor/_350_2dqemu_2dgpu_2ejson"),
    },
]


class Noop(ServiceInterface):
    def __init__(self) -> None:
        super().__init__("org.vhostuserd.Bench.Noop")

    @method()
    def Resolve(self, type: "s", features: "as") -> "oa{sv}":  # type: ignore[name-defined]
        return REPLY

    @method()
    def Ping(self) -> "":  # type: ignore[name-defined]
        return None


async def main(address: str) -> None:
    bus = await MessageBus(bus_address=address).connect()
    bus.export("/org/vhostuserd/Bench", Noop())
    await bus.request_name("org.vhostuserd.Bench")
    print("ready", flush=True)
    await bus.wait_for_disconnect()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
