"""The floor for P2: the least a watcher can do. Raw inotify on the given directories (and
their parents, to see them re-created), no coalescing, no index: one D-Bus signal
(PATH org.vhostuserd.BenchFloor.Seen) per read(2) that returned events.

    python bench/inotify_floor.py BUS_ADDRESS PATH DIR...
"""

from __future__ import annotations

import asyncio
import os
import sys

from dbus_fast import Message
from dbus_fast.aio import MessageBus

from vhostuserd.edges import inotify as ino

FILE_MASK = (
    ino.IN_CREATE
    | ino.IN_DELETE
    | ino.IN_MOVED_FROM
    | ino.IN_MOVED_TO
    | ino.IN_MODIFY
    | ino.IN_CLOSE_WRITE
    | ino.IN_ATTRIB
)


async def main(address: str, path: str, dirs: list[str]) -> None:
    bus = await MessageBus(bus_address=address).connect()
    watcher = ino.Inotify()
    parents: dict[int, str] = {}
    for d in dirs:
        watcher.add_watch(d, FILE_MASK)
        parents[watcher.add_watch(os.path.dirname(d), ino.IN_CREATE | ino.IN_ONLYDIR)] = (
            os.path.dirname(d)
        )

    def readable() -> None:
        events = watcher.read()
        if not events:
            return
        bus.send(Message.new_signal(path, "org.vhostuserd.BenchFloor", "Seen"))
        for e in events:
            if e.wd in parents and e.mask & ino.IN_CREATE:
                created = os.path.join(parents[e.wd], os.fsdecode(e.name))
                if created in dirs:
                    watcher.add_watch(created, FILE_MASK)

    asyncio.get_running_loop().add_reader(watcher.fileno(), readable)
    print("ready", flush=True)
    await bus.wait_for_disconnect()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
