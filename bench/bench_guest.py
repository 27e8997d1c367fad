"""Benchmark G1: a real guest's boot-to-poweroff with its virtio-fs backend spawned by
vhostuserd vs the same backend started by hand, in the same run.

    .venv/bin/python bench/bench_guest.py [--quick] [--rounds N]

The guest is the virtio-fs guest of tests/test_guest_virtiofs.py (tests/guest/: a stock
Debian kernel and a busybox initramfs; TCG unless hardware KVM runs a guest): it mounts the
share, reads 4 MiB and a token from it, writes 4 MiB back, and powers off. Each round boots
it twice, in alternating order: once on a socket served by Debian's virtiofsd that the
session daemon started for `vhostuserctl spawn 50-qemu-virtiofsd.json -o shared-dir=DIR
--listen SOCK --detach`, once on a socket served by the same binary with the same arguments
(the broker's Argv) started by this script with the listening socket as fd 3. The time is
from QEMU's start to its exit, the backend already serving; the ratio is of the medians.
Needs root (Debian's virtiofsd) and QEMU.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

import guest
from busutil import VHOSTUSERCTL, Daemon, PrivateBus, RealTree

DESCRIPTOR = "50-qemu-virtiofsd.json"
GOAL = 1.05
SCRIPT = """
mount -t virtiofs share /mnt || fail "mount"
dd if=/mnt/big of=/dev/null bs=64k 2>/dev/null || fail "read"
say "token $(cat /mnt/token)"
dd if=/dev/zero of=/mnt/out bs=64k count=64 2>/dev/null || fail "write"
umount /mnt || fail "umount"
pass
"""


def boot(work: Path, initrd: Path, token: str, sock: Path) -> float:
    """One boot to power-off on the backend serving ``sock``; seconds from QEMU's start."""
    work.mkdir()
    g = guest.Guest(work, initrd, token)
    argv = g.argv(
        "-chardev", f"socket,id=fs,path={sock}", "-device", "vhost-user-fs-pci,chardev=fs,tag=share"
    )
    t0 = time.perf_counter()
    g.popen(argv)
    try:
        g.wait_result()
    finally:
        g.kill()
    return time.perf_counter() - t0


def run(
    quick: bool, rounds: int | None = None
) -> tuple[list[dict[str, Any]], dict[str, list[float]]]:
    row = "G1 guest boot, virtio-fs"
    reason = guest.why_no_qemu() or (None if os.geteuid() == 0 else "Debian's virtiofsd needs root")
    if reason is None and not Path("/usr/share/qemu/vhost-user", DESCRIPTOR).is_file():
        reason = f"{DESCRIPTOR} is not installed"
    if reason:
        print(f"{row}: not measured: {reason}")
        return [
            {
                "row": row,
                "goal": f"<= {GOAL}x by hand",
                "measured": 0.0,
                "floor": None,
                "unit": "s",
                "ratio": None,
                "at_goal": True,
                "note": f"not measured: {reason}",
            }
        ], {}
    rounds = rounds or (2 if quick else 5)
    tmp = Path(tempfile.mkdtemp(prefix="vhostuserd-bench-guest-"))
    bus = PrivateBus()
    tree = RealTree.make(tmp / "tree")
    daemon = Daemon(bus, tree)
    shared = tmp / "shared"
    shared.mkdir()
    (shared / "big").write_bytes(os.urandom(4 << 20))
    (shared / "token").write_text("bench\n")
    initrd = tmp / "initrd"
    token = guest.build_initramfs(initrd, SCRIPT, guest.MODULES_FS)
    times: dict[str, list[float]] = {"broker": [], "by hand": []}
    argv: list[str] = []
    n = 0
    boots = iter(range(10**6))

    def by_broker() -> float:
        i = next(boots)
        sock = tmp / f"{i}.sock"
        r = subprocess.run(
            [
                VHOSTUSERCTL,
                "--address",
                bus.address,
                "spawn",
                DESCRIPTOR,
                "-o",
                f"shared-dir={shared}",
                "--listen",
                str(sock),
                "--detach",
            ],
            env=tree.env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if r.returncode != 0:
            raise RuntimeError(f"vhostuserctl spawn failed: {r.stderr}")
        backend = r.stdout.strip()
        listed = subprocess.run(
            [VHOSTUSERCTL, "--address", bus.address, "--json", "backends"],
            env=tree.env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        [rec] = [b for b in json.loads(listed.stdout) if b["id"] == backend]
        argv[:] = rec["argv"]
        seconds = boot(tmp / f"boot{i}-broker", initrd, token, sock)
        subprocess.run(
            [VHOSTUSERCTL, "--address", bus.address, "stop", backend],
            env=tree.env(),
            capture_output=True,
            timeout=60,
            check=False,
        )  # it exits with its front-end anyway
        return seconds

    def by_hand() -> float:
        i = next(boots)
        sock = tmp / f"{i}.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(sock))
        listener.listen(1)
        # The broker's way without the broker: fd 3 is the listener, 0-2 /dev/null, cwd /.
        high = fcntl.fcntl(listener.fileno(), fcntl.F_DUPFD_CLOEXEC, 10)
        null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        assert argv[1] == "--fd=3", argv
        try:
            pid = os.posix_spawn(
                argv[0],
                argv,
                {"PATH": "/usr/bin:/bin"},
                setsid=True,
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, null, 0),
                    (os.POSIX_SPAWN_DUP2, null, 1),
                    (os.POSIX_SPAWN_DUP2, null, 2),
                    (os.POSIX_SPAWN_DUP2, high, 3),
                ],
            )
        finally:
            for fd in (high, null):
                os.close(fd)
            listener.close()
        try:
            return boot(tmp / f"boot{i}-hand", initrd, token, sock)
        finally:
            deadline = time.monotonic() + 10
            while os.waitpid(pid, os.WNOHANG) == (0, 0):  # it exits with its front-end
                if time.monotonic() > deadline:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    break
                time.sleep(0.02)

    try:
        by_broker()  # a warm-up boot (page cache, the broker's first probe); also learns the argv
        for n in range(rounds):
            order = [("broker", by_broker), ("by hand", by_hand)]
            for name, fn in order if n % 2 == 0 else order[::-1]:
                times[name].append(fn())
                print(f"  round {n + 1}/{rounds} {name:8} {times[name][-1]:.2f} s", flush=True)
        daemon.assert_clean_log()
    finally:
        daemon.stop()
        bus.close()
        shutil.rmtree(tmp, ignore_errors=True)
    broker, hand = statistics.median(times["broker"]), statistics.median(times["by hand"])
    ratio = broker / hand
    note = (
        f"median of {rounds} each, accel {guest.accel()}; broker {min(times['broker']):.2f}-"
        f"{max(times['broker']):.2f} s, by hand {min(times['by hand']):.2f}-"
        f"{max(times['by hand']):.2f} s"
    )
    rows = [
        {
            "row": row,
            "goal": f"<= {GOAL}x by hand",
            "measured": broker,
            "floor": hand,
            "unit": "s",
            "ratio": ratio,
            "at_goal": ratio <= GOAL,
            "note": note,
        }
    ]
    return rows, {"G1 broker-spawned": times["broker"], "G1 by hand": times["by hand"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="2 rounds instead of 5")
    ap.add_argument("--rounds", type=int)
    a = ap.parse_args()
    rows, _ = run(a.quick, a.rounds)
    from report import print_table

    print()
    print_table(rows)
    sys.exit(0 if all(r["at_goal"] for r in rows) else 1)


if __name__ == "__main__":
    main()
