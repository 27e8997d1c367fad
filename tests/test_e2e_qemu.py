"""End to end with real things: QEMU with KVM, the Debian vhost-user-gpu and virtiofsd found
through their Debian descriptors, `vhostuserctl spawn` (CONTRACT section 4) and the daemon
on a private bus.

Skipped, saying why, without /dev/kvm, qemu-system-x86_64 or the Debian descriptors and
their binaries (scripts/setup installs them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from busutil import VHOSTUSERCTL, Daemon, PrivateBus, Tree
from helpers_spawn import Timer, alive, gone, kill_marked, wait_for

pytestmark = pytest.mark.e2e

REAL_DIR = Path("/usr/share/qemu/vhost-user")
QEMU = "qemu-system-x86_64"
ALIVE_FOR = 3.0
MACHINE = ["-machine", "q35,accel=kvm", "-m", "256",
           "-object", "memory-backend-memfd,id=mem,size=256M,share=on", "-numa", "node,memdev=mem",
           "-display", "none", "-S", "-nodefaults"]


class RealTree(Tree):
    """The test's tree, with /usr/share last in XDG_DATA_DIRS: the Debian descriptors."""

    def env(self) -> dict[str, str]:
        env = super().env()
        env["XDG_DATA_DIRS"] += ":/usr/share"
        return env


def require(*descriptors: str, kvm: bool = True) -> str:
    """Skip unless everything needed is here; returns the path of qemu-system-x86_64."""
    if kvm:
        if not os.path.exists("/dev/kvm"):
            pytest.skip("/dev/kvm is missing: QEMU cannot run with KVM here")
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            pytest.skip("/dev/kvm is not readable and writable by this user")
    qemu = shutil.which(QEMU) or ""
    if kvm and not qemu:
        pytest.skip(f"{QEMU} is not installed (scripts/setup installs qemu-system-x86)")
    for name in descriptors:
        path = REAL_DIR / name
        if not path.is_file():
            pytest.skip(f"{path} is not installed (scripts/setup installs the Debian QEMU packages)")
        binary = json.loads(path.read_text()).get("binary", "")
        if not os.access(binary, os.X_OK):
            pytest.skip(f"{path} names {binary!r}, which is not an executable here")
    return qemu


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
    r = subprocess.run([VHOSTUSERCTL, "--address", bus.address, "--json", "backends"], env=tree.env(),
                       capture_output=True, text=True, timeout=30, check=False)
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
        return subprocess.Popen([VHOSTUSERCTL, "--address", bus.address, *args], env=tree.env(),
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)


def kill_group(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            pass
        p.wait()


def test_qemu_and_vhost_user_gpu_run_together_under_vhostuserctl_exec(
        bus: PrivateBus, real_tree: RealTree, daemon: Daemon) -> None:
    require("50-qemu-gpu.json")
    log = real_tree.root / "ctl.log"
    ctl = start_ctl(bus, real_tree, log, "spawn", "50-qemu-gpu.json", "--exec", "--", QEMU, *MACHINE,
                    "-chardev", "socket,id=gpu,fd={fd}", "-device", "vhost-user-gpu-pci,chardev=gpu")
    try:
        def qemu_pid() -> int | None:
            m = re.search(r"\(pid (\d+)\)", log.read_text())
            if ctl.poll() is not None:
                raise AssertionError(f"vhostuserctl exited with {ctl.returncode}: {log.read_text()}")
            return int(m.group(1)) if m else None

        qemu = wait_for(qemu_pid, "vhostuserctl to start QEMU", 20)
        backend = one_running(bus, real_tree, "50-qemu-gpu.json")
        binary = json.loads((REAL_DIR / "50-qemu-gpu.json").read_text())["binary"]
        assert backend["argv"] == [binary, "--fd=3"]
        # The other end of the backend's socket is QEMU's fd 3, as the command line says.
        assert os.readlink(f"/proc/{qemu}/fd/3").startswith("socket:")
        t = Timer()
        while t.elapsed < ALIVE_FOR:
            assert alive(qemu), f"QEMU died: {log.read_text()}"
            assert alive(backend["pid"]), f"vhost-user-gpu died: {daemon.log()[-3000:]}"
            time.sleep(0.1)
        assert alive(qemu) and alive(backend["pid"]) and ctl.poll() is None

        # Stopping QEMU stops the backend, and vhostuserctl exits with QEMU's status.
        os.kill(qemu, signal.SIGTERM)
        assert ctl.wait(20) == 0, log.read_text()
        wait_for(lambda: not alive(backend["pid"]), "vhost-user-gpu to stop", 10)
        assert "backend " in log.read_text() and "stopped" in log.read_text(), log.read_text()
        assert all(b["state"] == "exited" for b in backends(bus, real_tree))
        wait_for(lambda: gone(qemu) and gone(backend["pid"]), "QEMU and the backend to be reaped", 5)
    finally:
        kill_group(ctl)


def test_qemu_and_virtiofsd_run_together_under_vhostuserctl_listen(
        bus: PrivateBus, real_tree: RealTree, daemon: Daemon, tmp_path: Path) -> None:
    qemu_binary = require("50-qemu-virtiofsd.json")
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "hello.txt").write_text("hello from the host\n")
    sock = tmp_path / "virtiofsd.sock"
    log = real_tree.root / "ctl.log"
    ctl = start_ctl(bus, real_tree, log, "spawn", "50-qemu-virtiofsd.json", "-o", f"shared-dir={shared}",
                    "--listen", str(sock))
    qemu: subprocess.Popen[bytes] | None = None
    try:
        backend = one_running(bus, real_tree, "50-qemu-virtiofsd.json")
        # The Debian (C) virtiofsd lists no separate-options: -o source=DIR.
        assert backend["argv"][1:] in (["--fd=3", f"--shared-dir={shared}"],
                                       ["--fd=3", "-o", f"source={shared}"])
        with open(real_tree.root / "qemu.log", "wb") as qlog:
            qemu = subprocess.Popen([qemu_binary, *MACHINE, "-chardev", f"socket,id=fs,path={sock}",
                                     "-device", "vhost-user-fs-pci,chardev=fs,tag=share"],
                                    stdout=qlog, stderr=subprocess.STDOUT, start_new_session=True)
        # virtiofsd accepts QEMU on the socket vhostuserctl bound and the daemon passed on.
        wait_for(lambda: "Received vhost-user socket connection" in daemon.log() or qemu.poll() is not None,
                 "virtiofsd to accept QEMU", 20)
        t = Timer()
        while t.elapsed < ALIVE_FOR:
            assert qemu.poll() is None, (real_tree.root / "qemu.log").read_text()
            assert alive(backend["pid"]), daemon.log()[-3000:]
            time.sleep(0.1)
        assert ctl.poll() is None

        # QEMU goes; virtiofsd, its front-end gone, exits; then Ctrl-C to vhostuserctl (if
        # it is still waiting) and nothing of this is left running.
        qemu.send_signal(signal.SIGTERM)
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
        wait_for(lambda: gone(backend["pid"]) and gone(qemu.pid), "QEMU and virtiofsd to be reaped", 5)
    finally:
        if qemu is not None:
            kill_group(qemu)
        kill_group(ctl)


def test_ctrl_c_to_vhostuserctl_listen_stops_virtiofsd(
        bus: PrivateBus, real_tree: RealTree, daemon: Daemon, tmp_path: Path) -> None:
    require("50-qemu-virtiofsd.json", kvm=False)
    shared = tmp_path / "shared"
    shared.mkdir()
    sock = tmp_path / "virtiofsd.sock"
    log = real_tree.root / "ctl.log"
    ctl = start_ctl(bus, real_tree, log, "spawn", "50-qemu-virtiofsd.json", "-o", f"shared-dir={shared}",
                    "--listen", str(sock))
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
