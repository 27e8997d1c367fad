"""A D-Bus client driven over stdin/stdout, for tests that need a caller of another uid (see
`helpers_auth.Caller`, which starts it through setpriv).

Run as a script by the test's Python (it needs dbus-fast):

    caller.py ADDRESS   connect to the bus at ADDRESS, print {"hello": UNIQUE_NAME, "uid": UID,
                        "pid": PID}, then read one JSON command a line from stdin:
        {"op": "call", "id": N, "member": ..., "signature": ..., "body": [...],
         "destination"?, "path"?, "interface"?, "interactive"?}
                        a method call (by default to the broker's Manager); each reply is
                        printed as {"id": N, "body": [...]}, {"id": N, "error": NAME,
                        "message": TEXT} or {"id": N, "local_error": TEXT}, in the order
                        they come (calls run concurrently);
        {"op": "fake_root", "id": N, "dir": DIR}
                        become root of a user namespace of its own and chroot to DIR;
        {"op": "exit"}  disconnect and exit (so does the end of stdin).

In a body, {"$v": [SIG, VALUE]} is a Variant, {"$fd": KIND} a new fd of that kind (see
`make_fd`), {"$bytes": HEX} bytes and {"$tuple": [...]} a struct.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import socket
import sys
from typing import Any

from dbus_fast import Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus

libc = ctypes.CDLL(None, use_errno=True)
keep: list[Any] = []


def out(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def make_fd(kind: str, fds: list[int]) -> int:
    if kind == "socketpair":
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        keep.append(b)
        fd = a.detach()
    elif kind == "listen":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind("")  # autobind: an abstract address
        s.listen(1)
        fd = s.detach()
    elif kind == "dgram":
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        keep.append(b)
        fd = a.detach()
    elif kind == "seqpacket":
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        keep.append(b)
        fd = a.detach()
    elif kind == "tcp":
        fd = socket.socket(socket.AF_INET, socket.SOCK_STREAM).detach()
    elif kind == "pipe":
        r, w = os.pipe()
        keep.append(w)
        fd = r
    elif kind == "devnull":
        fd = os.open("/dev/null", os.O_RDONLY)
    elif kind == "opath":
        fd = os.open("/", os.O_PATH)
    elif kind == "dir":
        fd = os.open("/", os.O_RDONLY)
    else:
        raise ValueError(kind)
    fds.append(fd)
    return len(fds) - 1


def decode(x: Any, fds: list[int]) -> Any:
    if isinstance(x, dict):
        if "$v" in x:
            sig, value = x["$v"]
            return Variant(sig, decode(value, fds))
        if "$fd" in x:
            return make_fd(x["$fd"], fds)
        if "$bytes" in x:
            return bytes.fromhex(x["$bytes"])
        if "$tuple" in x:
            return [decode(v, fds) for v in x["$tuple"]]
        return {k: decode(v, fds) for k, v in x.items()}
    if isinstance(x, list):
        return [decode(v, fds) for v in x]
    return x


def encode(x: Any) -> Any:
    if isinstance(x, Variant):
        return encode(x.value)
    if isinstance(x, dict):
        return {str(k): encode(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [encode(v) for v in x]
    if isinstance(x, bytes):
        return list(x)
    return x


async def call(bus: MessageBus, cmd: dict[str, Any]) -> dict[str, Any]:
    fds: list[int] = []
    try:
        body = decode(cmd.get("body", []), fds)
        flags = MessageFlag.NONE
        if cmd.get("interactive"):
            flags |= MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION
        msg = Message(
            destination=cmd.get("destination", "org.vhostuserd.Broker1"),
            path=cmd.get("path", "/org/vhostuserd/Broker1"),
            interface=cmd.get("interface", "org.vhostuserd.Broker1.Manager"),
            member=cmd["member"],
            signature=cmd.get("signature", ""),
            body=body,
            unix_fds=fds,
            flags=flags,
        )
        reply = await bus.call(msg)
    except Exception as e:
        return {"id": cmd["id"], "local_error": f"{type(e).__name__}: {e}"}
    finally:
        for fd in fds:
            os.close(fd)
    if reply is None:
        return {"id": cmd["id"], "local_error": "no reply"}
    if reply.message_type is MessageType.ERROR:
        return {
            "id": cmd["id"],
            "error": reply.error_name,
            "message": reply.body[0] if reply.body and isinstance(reply.body[0], str) else "",
        }
    return {"id": cmd["id"], "body": encode(reply.body)}


def fake_root(directory: str) -> None:
    """Become root of a user namespace of our own and chroot: what any user can do where
    unprivileged user namespaces are allowed. The bus connection stays open."""
    clone_newuser = 0x10000000
    if libc.unshare(clone_newuser) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER)")
    os.chroot(directory)
    os.chdir("/")


async def main() -> None:
    bus = await MessageBus(bus_address=sys.argv[1], negotiate_unix_fd=True).connect()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)  # tests send calls of several MB
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    # One warm-up call, so that nothing is imported lazily after a chroot.
    await call(
        bus,
        {
            "id": -1,
            "destination": "org.freedesktop.DBus",
            "path": "/org/freedesktop/DBus",
            "interface": "org.freedesktop.DBus",
            "member": "GetId",
        },
    )
    out({"hello": bus.unique_name, "uid": os.getuid(), "pid": os.getpid()})
    tasks: set[asyncio.Future[None]] = set()

    async def run(cmd: dict[str, Any]) -> None:
        out(await call(bus, cmd))

    while True:
        line = await reader.readline()
        if not line:
            break
        cmd = json.loads(line)
        op = cmd.get("op", "call")
        if op == "call":
            t = asyncio.ensure_future(run(cmd))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        elif op == "fake_root":
            try:
                fake_root(cmd["dir"])
                out({"id": cmd["id"], "body": []})
            except OSError as e:
                out({"id": cmd["id"], "local_error": str(e)})
        elif op == "exit":
            break
    bus.disconnect()


if __name__ == "__main__":
    asyncio.run(main())
