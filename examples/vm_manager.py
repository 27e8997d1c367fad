#!/usr/bin/env python3
"""A VM manager's use of vhostuserd, complete: resolve a gpu backend, spawn it on one end of a
socketpair, hand the other end to QEMU, and stop the backend when QEMU is done.

    python examples/vm_manager.py [--system | --address ADDR] [--seconds N] [-- EXTRA QEMU ARGS]

The broker chooses the backend (by the descriptor lookup rules and probed capabilities),
starts it with the right kind of socket and supervises it; the VM manager never runs a
backend binary itself, so it works the same from inside a Flatpak sandbox.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys

from vhostuserd.client import BrokerClient, BrokerError


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--system", action="store_true")
    ap.add_argument("--address")
    ap.add_argument("--seconds", type=float, default=5, help="how long to let the VM run")
    ap.add_argument("qemu_args", nargs="*")
    a = ap.parse_args()
    bus = "address" if a.address else ("system" if a.system else "user")

    async with await BrokerClient.connect(bus, a.address) as broker:
        # 1. Which backend? The first gpu descriptor whose backend says it can do virgl.
        try:
            gpu = await broker.resolve("gpu", ["virgl"])
        except BrokerError as e:
            print(f"no suitable vhost-user-gpu: {e}", file=sys.stderr)
            return 1
        print(f"using {gpu.name}: {gpu.binary} (features {', '.join(gpu.features or ())})")

        # 2. gpu backends take a connected socket: one end for the backend, one for QEMU.
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        backend = await broker.spawn(gpu.name, theirs.fileno(), {"virgl": True})
        theirs.close()  # the broker has its own copy now
        print(f"backend {backend} running, pid {(await broker.backend(backend))['Pid']}")

        # 3. QEMU gets the other end as an inherited fd.
        os.set_inheritable(ours.fileno(), True)
        qemu = await asyncio.create_subprocess_exec(
            "qemu-system-x86_64",
            "-machine",
            "q35,accel=kvm",
            "-m",
            "256",
            "-object",
            "memory-backend-memfd,id=mem,size=256M,share=on",
            "-numa",
            "node,memdev=mem",
            "-chardev",
            f"socket,id=gpu,fd={ours.fileno()}",
            "-device",
            "vhost-user-gpu-pci,chardev=gpu",
            "-display",
            "none",
            "-S",
            "-nodefaults",
            *a.qemu_args,
            pass_fds=(ours.fileno(),),
        )
        ours.close()

        # 4. Run, then shut down: QEMU first, then the backend (which also goes away by
        #    itself if this program dies: it belongs to our bus connection).
        try:
            await asyncio.wait_for(qemu.wait(), a.seconds)
        except TimeoutError:
            qemu.send_signal(signal.SIGTERM)
            await qemu.wait()
        await broker.stop(backend)
        print(f"QEMU exited with {qemu.returncode}; backend stopped")
        print((await broker.get_log(backend))[-500:], end="")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
