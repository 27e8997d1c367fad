#!/usr/bin/env python3
"""Looks at what it got as --fd=N and reports it. A connected socket: writes a greeting on
it. A listening one: accepts one front-end (within ``accept_timeout`` s) and greets it."""

import os
import socket
import stat
import sys

from fakelib import forever, report, start

cfg = start()
fd = next(int(a.split("=", 1)[1]) for a in sys.argv[1:] if a.startswith("--fd="))
got: dict[str, object] = {"fd": fd}
try:
    st = os.fstat(fd)
    got["is_socket"] = stat.S_ISSOCK(st.st_mode)
    got["inode"] = st.st_ino
    s = socket.socket(fileno=fd)
    got["family"] = s.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
    got["type"] = s.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
    got["listening"] = bool(s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
except OSError as e:
    got["error"] = str(e)
    report(cfg, behaviour="checks-socket", got=got)
    raise SystemExit(2) from None
greeting = f"hello from backend {os.getpid()}\n".encode()
if got["listening"]:
    s.settimeout(float(cfg.get("accept_timeout", 10)))
    try:
        conn, _ = s.accept()
        conn.sendall(greeting)
        got["accepted"] = True
    except OSError as e:
        got["accepted"] = False
        got["error"] = str(e)
else:
    try:
        s.sendall(greeting)
        got["greeted"] = True
    except OSError as e:
        got["greeted"] = False
        got["error"] = str(e)
report(cfg, behaviour="checks-socket", got=got)
forever()
