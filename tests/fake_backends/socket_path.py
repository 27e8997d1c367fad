#!/usr/bin/env python3
"""A rust-vmm style backend (vhost-device-*): no --print-capabilities (a probe is recorded
and fails), its socket only as --socket-path PATH, accepting ``/proc/self/fd/N`` for an
inherited listening socket. Accepts one front-end, greets it, reports, runs on."""

import json
import os
import socket
import sys

with open(sys.argv[0] + ".conf.json") as f:
    cfg = json.load(f)
if "--print-capabilities" in sys.argv[1:]:
    with open(os.path.join(cfg["report_dir"], "probed"), "w") as f:
        f.write("probed\n")
    print("error: unexpected argument '--print-capabilities'", file=sys.stderr)
    raise SystemExit(2)
args = sys.argv[1:]
paths = [a.split("=", 1)[1] for a in args if a.startswith("--socket-path=")]
got: dict[str, object] = {"paths": paths}
if len(paths) != 1 or not paths[0].startswith("/proc/self/fd/"):
    got["error"] = "needs one --socket-path=/proc/self/fd/N"
    code = 2
else:
    s = socket.socket(fileno=int(paths[0].rsplit("/", 1)[1]))
    got["listening"] = bool(s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    s.settimeout(10)
    conn, _ = s.accept()
    conn.sendall(f"hello from backend {os.getpid()}\n".encode())
    got["accepted"] = True
    code = 0
tmp = os.path.join(cfg["report_dir"], f".{os.getpid()}.tmp")
with open(tmp, "w") as f:
    json.dump({"pid": os.getpid(), "argv": args, "got": got}, f)
os.replace(tmp, os.path.join(cfg["report_dir"], f"{os.getpid()}.json"))
if code:
    raise SystemExit(code)
while True:
    os.pause()
