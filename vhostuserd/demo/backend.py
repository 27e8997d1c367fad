"""A tiny backend that follows QEMU's backend program conventions, for demos and tests.

``--print-capabilities`` prints its type and features; ``--fd=N`` takes a connected socket
(gpu, input) or a listening one (block, fs, scsi) and serves one front-end by echoing
nothing and waiting for it to hang up; SIGTERM ends it at once (the default action).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys

from vhostuserd.demo import DEMO_TYPES

LISTENING_TYPES = {"block", "fs", "scsi"}
# The command-line options of QEMU's contrib backends and virtiofsd, per type.
FLAGS = {"gpu": ("--virgl",), "input": ("--no-grab",), "block": ("--read-only",)}
VALUED = {
    "gpu": ("--render-node",),
    "input": ("--evdev-path",),
    "block": ("--blk-file",),
    "fs": ("--shared-dir",),
}


def main(btype: str, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"vhostuserd-demo-{btype}")
    parser.add_argument("--print-capabilities", action="store_true")
    parser.add_argument("--fd", type=int)
    parser.add_argument("--socket-path")
    for flag in FLAGS.get(btype, ()):
        parser.add_argument(flag, action="store_true")
    for option in VALUED.get(btype, ()):
        parser.add_argument(option)
    parser.add_argument("-o", action="append", default=[], help="virtiofsd-style -o source=DIR")
    args = parser.parse_args(argv)
    if args.print_capabilities:
        print(json.dumps({"type": btype, "features": DEMO_TYPES.get(btype, [])}))
        return 0
    if (args.fd is None) == (args.socket_path is None):
        print("exactly one of --fd and --socket-path is required", file=sys.stderr)
        return 1
    if args.socket_path is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(args.socket_path)
        sock.listen(1)
    else:
        sock = socket.socket(fileno=args.fd)
    listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) != 0
    if btype in LISTENING_TYPES and not listening:
        print(f"--fd={args.fd} must be a listening socket for a {btype} backend", file=sys.stderr)
        return 1
    if btype not in LISTENING_TYPES and args.fd is not None and listening:
        print(f"--fd={args.fd} must be a connected socket for a {btype} backend", file=sys.stderr)
        return 1
    print(f"demo {btype} backend {os.getpid()}: serving", file=sys.stderr, flush=True)
    conn = sock.accept()[0] if listening else sock
    while conn.recv(65536):
        pass
    print(f"demo {btype} backend {os.getpid()}: front-end hung up, exiting", file=sys.stderr)
    return 0
