"""`vhostuserctl spawn --listen` (docs/contract.md section 4) with Debian's virtiofsd, found through
its Debian descriptor, and the daemon on a private bus: a fast smoke test that a *paused*
QEMU (-S, no guest, no downloads) connects to the socket, and Ctrl-C to vhostuserctl.

What a booted guest does with the backends the broker spawns is proved in
tests/test_guest_virtiofs.py, tests/test_guest_gpu.py and tests/test_guest_client.py.
Skipped, saying why, without qemu-system-x86_64 or the Debian descriptors and their binaries
(scripts/setup installs them).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import guest
import pytest
from busutil import VHOSTUSERCTL, Daemon, PrivateBus, RealTree, Tree, wait_for
from helpers_spawn import alive, gone, kill_marked

pytestmark = pytest.mark.e2e

QEMU = "qemu-system-x86_64"
# Paused from the start: no guest runs, so TCG costs nothing and KVM is not needed.
MACHINE = [
    "-machine",
    "q35,accel=tcg",
    "-m",
    "256",
    "-object",
    "memory-backend-memfd,id=mem,size=256M,share=on",
    "-numa",
    "node,memdev=mem",
    "-display",
    "none",
    "-S",
    "-nodefaults",
]


def require(*descriptors: str, qemu: bool = True) -> str:
    """Skip unless everything needed is here; returns the path of qemu-system-x86_64."""
    binary_qemu = shutil.which(QEMU) or ""
    if qemu and not binary_qemu:
        pytest.skip(f"{QEMU} is not installed (scripts/setup installs qemu-system-x86)")
    for name in descriptors:
        reason = guest.why_no_debian_backend(name)
        if reason:
            pytest.skip(reason)
    return binary_qemu


@pytest.fixture
def real_tree(tmp_path: Path) -> Iterator[RealTree]:
    t = RealTree.make(tmp_path / "tree")
    yield t
    kill_marked(t)


@pytest.fixture
def daemon(bus: PrivateBus, real_tree: RealTree) -> Iterator[Daemon]:
    d = Daemon(bus, real_tree, "--grace-period", "2")
    yield d
    d.stop()


def backends(bus: PrivateBus, tree: Tree) -> list[dict[str, Any]]:
    r = subprocess.run(
        [VHOSTUSERCTL, "--address", bus.address, "--json", "backends"],
        env=tree.env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    items: list[dict[str, Any]] = json.loads(r.stdout)
    return items


def one_running(bus: PrivateBus, tree: Tree, descriptor: str) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        running = [b for b in backends(bus, tree) if b["state"] == "running"]
        return running[0] if len(running) == 1 and running[0]["descriptor"] == descriptor else None

    result: dict[str, Any] = wait_for(found, f"one running {descriptor} backend", 20)
    return result


def start_ctl(bus: PrivateBus, tree: Tree, log: Path, *args: str) -> subprocess.Popen[bytes]:
    """vhostuserctl in its own process group (for cleanup), its stderr in ``log``."""
    with open(log, "wb") as err:
        return subprocess.Popen(
            [VHOSTUSERCTL, "--address", bus.address, *args],
            env=tree.env(),
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )


def kill_group(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            pass
        p.wait()


def test_paused_qemu_connects_to_the_virtiofsd_that_vhostuserctl_listen_had_spawned(
    bus: PrivateBus, real_tree: RealTree, daemon: Daemon, tmp_path: Path
) -> None:
    qemu_binary = require("50-qemu-virtiofsd.json")
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "hello.txt").write_text("hello from the host\n")
    sock = tmp_path / "virtiofsd.sock"
    qmp = tmp_path / "qmp.sock"
    log = real_tree.root / "ctl.log"
    ctl = start_ctl(
        bus,
        real_tree,
        log,
        "spawn",
        "50-qemu-virtiofsd.json",
        "-o",
        f"shared-dir={shared}",
        "--listen",
        str(sock),
    )
    qemu: subprocess.Popen[bytes] | None = None
    try:
        backend = one_running(bus, real_tree, "50-qemu-virtiofsd.json")
        # The Debian (C) virtiofsd lists no separate-options: -o source=DIR.
        assert backend["argv"][1:] in (
            ["--fd=3", f"--shared-dir={shared}"],
            ["--fd=3", "-o", f"source={shared}"],
        )
        with open(real_tree.root / "qemu.log", "wb") as qlog:
            qemu = subprocess.Popen(
                [
                    qemu_binary,
                    *MACHINE,
                    "-qmp",
                    f"unix:{qmp},server=on,wait=off",
                    "-chardev",
                    f"socket,id=fs,path={sock}",
                    "-device",
                    "vhost-user-fs-pci,chardev=fs,tag=share",
                ],
                stdout=qlog,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        # virtiofsd accepts QEMU on the socket vhostuserctl bound and the daemon passed on.
        wait_for(
            lambda: (
                "Received vhost-user socket connection" in daemon.log() or qemu.poll() is not None
            ),
            "virtiofsd to accept QEMU",
            20,
        )
        assert qemu.poll() is None, (real_tree.root / "qemu.log").read_text()
        assert alive(backend["pid"]), daemon.log()[-3000:]
        # The Spawn call has settled (a backend gone within settle-ms would fail it).
        wait_for(
            lambda: "Ctrl-C stops it" in log.read_text() or ctl.poll() is not None,
            "vhostuserctl to report the backend serving",
        )
        assert ctl.poll() is None, log.read_text()

        # QEMU goes; virtiofsd, its front-end gone, exits; then Ctrl-C to vhostuserctl (if
        # it is still waiting) and nothing of this is left running.
        guest.qmp(qmp, "quit")
        assert qemu.wait(20) == 0
        wait_for(lambda: not alive(backend["pid"]), "virtiofsd to exit after QEMU", 10)
        try:
            # It follows the backend: seeing it exit, it reports that and exits 1.
            ctl.wait(5)
            assert ctl.returncode == 1 and "backend exited" in log.read_text(), log.read_text()
        except subprocess.TimeoutExpired:
            ctl.send_signal(signal.SIGINT)
            assert ctl.wait(20) == 0, log.read_text()
        assert not sock.exists(), "vhostuserctl removes the socket it bound"
        assert all(b["state"] == "exited" for b in backends(bus, real_tree))
        wait_for(
            lambda: gone(backend["pid"]) and gone(qemu.pid), "QEMU and virtiofsd to be reaped", 5
        )
    finally:
        if qemu is not None:
            kill_group(qemu)
        kill_group(ctl)


def test_ctrl_c_to_vhostuserctl_listen_stops_virtiofsd(
    bus: PrivateBus, real_tree: RealTree, daemon: Daemon, tmp_path: Path
) -> None:
    require("50-qemu-virtiofsd.json", qemu=False)
    shared = tmp_path / "shared"
    shared.mkdir()
    sock = tmp_path / "virtiofsd.sock"
    log = real_tree.root / "ctl.log"
    ctl = start_ctl(
        bus,
        real_tree,
        log,
        "spawn",
        "50-qemu-virtiofsd.json",
        "-o",
        f"shared-dir={shared}",
        "--listen",
        str(sock),
    )
    try:
        backend = one_running(bus, real_tree, "50-qemu-virtiofsd.json")
        wait_for(lambda: "Ctrl-C stops it" in log.read_text(), "vhostuserctl to wait for Ctrl-C")
        ctl.send_signal(signal.SIGINT)
        assert ctl.wait(20) == 0, log.read_text()
        # vhostuserctl returned after Stop, which returns once the backend is gone.
        assert gone(backend["pid"]), "virtiofsd must be gone (reaped) when vhostuserctl exits"
        assert not sock.exists()
        assert all(b["state"] == "exited" for b in backends(bus, real_tree))
    finally:
        kill_group(ctl)
