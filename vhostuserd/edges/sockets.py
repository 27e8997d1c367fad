"""What a received socket fd is: the facts `core.policy.socket_error` decides on (its flags,
file type, family, type, and whether it listens or is connected), read without changing it."""

from __future__ import annotations

import fcntl
import os
import socket
import stat

from vhostuserd.core.policy import SocketFacts

_O_PATH = getattr(os, "O_PATH", 0o10000000)
_TYPES: dict[int, str] = {
    socket.SOCK_STREAM: "SOCK_STREAM",
    socket.SOCK_DGRAM: "SOCK_DGRAM",
    socket.SOCK_SEQPACKET: "SOCK_SEQPACKET",
}


def socket_facts(fd: int) -> SocketFacts:
    """The facts of ``fd``, up to the first step that fails (see `SocketFacts`)."""
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        st = os.fstat(fd)
    except OSError as e:
        return SocketFacts(unusable=str(e.strerror))
    if flags & _O_PATH:
        return SocketFacts(o_path=True)
    if not stat.S_ISSOCK(st.st_mode):
        return SocketFacts(file_type="fifo" if stat.S_ISFIFO(st.st_mode) else "other")
    try:
        sock = socket.socket(fileno=os.dup(fd))  # a duplicate: closing it leaves ``fd`` open
    except OSError as e:
        return SocketFacts(uninspectable=str(e.strerror))
    try:
        family = sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
        stype = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        listening = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        try:
            connected = not listening and sock.getpeername() is not None
        except OSError:
            connected = False
    finally:
        sock.close()
    return SocketFacts(
        unix=family == socket.AF_UNIX,
        family=family,
        stype=_TYPES.get(stype, str(stype)),
        listening=listening,
        connected=connected,
    )
