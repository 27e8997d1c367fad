"""The systemd file descriptor store: where the daemon keeps each backend's pidfd and the read
end of its output pipe (``backend-ID-pid``, ``backend-ID-log``), so that a restarted daemon
gets them back from systemd (`readopt`) without opening anything through a backend's fd table.
Without a NOTIFY_SOCKET from systemd, nothing is stored."""

from __future__ import annotations

import array
import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("vhostuserd.fdstore")


class FdStore:
    """The systemd file descriptor store (sd_notify FDSTORE=1 with FDNAME=, fds back as
    LISTEN_FDS / LISTEN_FDNAMES at the next start), when systemd gave us a NOTIFY_SOCKET.

    What systemd passed at start-up is taken at once (``taken``), only if LISTEN_PID is us;
    the variables are removed so that nothing we start sees them."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address = ("\0" + path[1:]) if path.startswith("@") else path
        self.taken: dict[str, int] = {}
        n, names, listen_pid = (
            env.get("LISTEN_FDS", ""),
            env.get("LISTEN_FDNAMES", ""),
            env.get("LISTEN_PID", ""),
        )
        if environ is None:
            for var in ("LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID"):
                os.environ.pop(var, None)
        if not (n.isdigit() and listen_pid == str(os.getpid())):
            return
        labels = names.split(":") if names else []
        for i in range(int(n)):
            fd = 3 + i
            try:
                os.set_inheritable(fd, False)
            except OSError:
                continue
            name = labels[i] if i < len(labels) else ""
            if name in self.taken or not name.startswith("backend-"):
                os.close(fd)  # not one of ours (or a duplicate): nothing will use it
                continue
            self.taken[name] = fd

    @property
    def available(self) -> bool:
        return bool(self.address.startswith(("/", "\0")))

    def _send(self, text: str, fds: list[int]) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                # (socket.send_fds ignores its address argument before Python 3.12.)
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
                s.sendmsg([text.encode()], anc, 0, self.address)
            return True
        except OSError as e:
            log.warning("file descriptor store: %s failed: %s", text.replace("\n", " "), e)
            return False

    def add(self, name: str, fd: int) -> bool:
        return self.available and self._send(f"FDSTORE=1\nFDNAME={name}", [fd])

    def remove(self, name: str) -> None:
        if self.available:
            self._send(f"FDSTOREREMOVE=1\nFDNAME={name}", [])

    def pop(self, name: str) -> int | None:
        return self.taken.pop(name, None)
