"""A D-Bus client with nothing but the standard library, for tests that need a peer that
misbehaves on the wire (never reads its replies, or comes and goes by the thousand).

Run as a script (by any uid's python3: it imports nothing outside the standard library):

    rawbus.py flood SOCKET MESSAGES   connect, send every pre-marshalled message in the file
                                      MESSAGES (4-byte little-endian length, then the bytes),
                                      print "sent N", then never read a reply until stdin closes.
    rawbus.py churn SOCKET COUNT      COUNT connections that say Hello and leave; print "done".

The messages are marshalled by the test with dbus-fast (serials from 2; this client sends the
Hello as serial 1 itself).
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import threading

# Hello, serial 1, little-endian, no body: marshalled once by hand from the spec.
_HELLO_FIELDS = [
    (1, "o", "/org/freedesktop/DBus"),
    (2, "s", "org.freedesktop.DBus"),
    (3, "s", "Hello"),
    (6, "s", "org.freedesktop.DBus"),
]


def _pad(buf: bytearray, n: int) -> None:
    while len(buf) % n:
        buf.append(0)


def hello() -> bytes:
    fields = bytearray()
    for code, sig, value in _HELLO_FIELDS:
        _pad(fields, 8)
        fields += bytes([code, 1]) + sig.encode() + b"\0"
        _pad(fields, 4)
        data = value.encode()
        fields += struct.pack("<I", len(data)) + data + b"\0"
    head = bytearray(b"l\x01\x00\x01" + struct.pack("<III", 0, 1, len(fields)))
    head += fields
    _pad(head, 8)
    return bytes(head)


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(b"\0AUTH EXTERNAL " + str(os.getuid()).encode().hex().encode() + b"\r\n")
    line = b""
    while not line.endswith(b"\r\n"):
        chunk = s.recv(256)
        if not chunk:
            raise ConnectionError("the bus closed the connection during authentication")
        line += chunk
    if not line.startswith(b"OK "):
        raise ConnectionError(f"authentication refused: {line!r}")
    s.sendall(b"BEGIN\r\n" + hello())
    return s


def flood(path: str, messages: str) -> None:
    with open(messages, "rb") as f:
        data = f.read()
    s = connect(path)
    n = 0
    offset = 0
    while offset < len(data):
        (size,) = struct.unpack_from("<I", data, offset)
        s.sendall(data[offset + 4 : offset + 4 + size])
        offset += 4 + size
        n += 1
    print(f"sent {n}", flush=True)
    sys.stdin.read()  # never read the socket: replies pile up until we are told to go
    s.close()


def churn(path: str, count: int) -> None:
    def worker(k: int) -> None:
        for _ in range(k):
            s = connect(path)
            s.recv(4096)  # the Hello reply: the connection has its unique name now
            s.close()

    threads = [
        threading.Thread(target=worker, args=(count // 4 + (i < count % 4),)) for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("done", flush=True)


if __name__ == "__main__":
    verb, sock, arg = sys.argv[1:4]
    if verb == "flood":
        flood(sock, arg)
    else:
        churn(sock, int(arg))
