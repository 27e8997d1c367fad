#!/usr/bin/env python3
"""A VM manager boots a real guest with a virtio-fs share whose backend the broker runs:
resolve an fs backend, spawn it on a listening socket, point QEMU's vhost-user-fs device at
that socket, let the guest run to power-off, then stop the backend.

    python examples/boot_guest.py [--system | --address ADDR] --kernel VMLINUZ --initrd INITRD
        --share DIR [--tag TAG] [--accel tcg|kvm] [--seconds N] [--qemu QEMU] [-- EXTRA QEMU ARGS]

The guest's serial console is this program's standard input and output (its /init mounts
the share with `mount -t virtiofs TAG /mnt`). vhost-user backends map the guest's memory,
so QEMU gets a shared memory backend. Exit status: QEMU's, or 1 when no backend fits or the
guest overstays --seconds (QEMU is then stopped).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
import tempfile

from vhostuserd.client import BrokerClient, BrokerError


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--system", action="store_true")
    ap.add_argument("--address")
    ap.add_argument("--kernel", required=True)
    ap.add_argument("--initrd", required=True)
    ap.add_argument("--share", required=True, help="the host directory the guest mounts")
    ap.add_argument("--tag", default="share")
    ap.add_argument("--accel", default="tcg", help="QEMU accelerator (kvm needs hardware KVM)")
    ap.add_argument("--seconds", type=float, default=120, help="longest the guest may run")
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("qemu_args", nargs="*")
    a = ap.parse_args()
    bus = "address" if a.address else ("system" if a.system else "user")

    async with await BrokerClient.connect(bus, a.address) as broker:
        # 1. Which backend? The first fs descriptor by the lookup rules.
        try:
            fs = await broker.resolve("fs")
        except BrokerError as e:
            print(f"no virtio-fs backend: {e}", file=sys.stderr)
            return 1
        print(f"using {fs.name}: {fs.binary}", file=sys.stderr, flush=True)

        with tempfile.TemporaryDirectory(prefix="boot-guest-") as tmp:
            # 2. fs backends take a listening socket; QEMU connects to its path.
            path = os.path.join(tmp, "fs.sock")
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(path)
            listener.listen(1)
            try:
                backend = await broker.spawn(fs.name, listener.fileno(), {"shared-dir": a.share})
            finally:
                listener.close()  # the broker passed its own copy on
            props = await broker.backend(backend)
            print(
                f"backend {props['Id']} pid {props['Pid']}: {' '.join(props['Argv'])}",
                file=sys.stderr,
                flush=True,
            )

            # 3. The guest: its RAM shared with the backend, the device on the socket.
            qemu = await asyncio.create_subprocess_exec(
                a.qemu,
                "-machine",
                f"q35,accel={a.accel}",
                "-m",
                "256",
                "-nodefaults",
                "-no-reboot",
                "-object",
                "memory-backend-memfd,id=mem,size=256M,share=on",
                "-numa",
                "node,memdev=mem",
                "-kernel",
                a.kernel,
                "-initrd",
                a.initrd,
                "-append",
                "console=ttyS0 quiet panic=-1",
                "-chardev",
                "stdio,id=con,signal=off",
                "-serial",
                "chardev:con",
                "-display",
                "none",
                "-chardev",
                f"socket,id=fs,path={path}",
                "-device",
                f"vhost-user-fs-pci,chardev=fs,tag={a.tag}",
                *a.qemu_args,
            )
            try:
                code = await asyncio.wait_for(qemu.wait(), a.seconds)
            except TimeoutError:
                print(f"the guest ran longer than {a.seconds:g}s; stopping QEMU", file=sys.stderr)
                qemu.send_signal(signal.SIGTERM)
                await qemu.wait()
                code = 1

            # 4. The guest powered off: the backend's front-end is gone. Stop it (it may
            #    already have exited; it would also go when this program leaves the bus).
            try:
                await broker.stop(backend)
            except BrokerError:
                pass
            print(
                f"QEMU exited with {qemu.returncode}; backend {props['Id']} stopped",
                file=sys.stderr,
            )
    return code


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
