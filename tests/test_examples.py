"""The documented VM-manager example runs for real: resolve, spawn, QEMU, stop."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from busutil import REPO, Daemon, PrivateBus, Tree


def test_vm_manager_example_resolves_spawns_and_hands_the_socket_to_qemu(
    bus: PrivateBus, tree: Tree
) -> None:
    if not os.path.exists("/dev/kvm"):
        pytest.skip("/dev/kvm is missing: QEMU end-to-end tests need KVM")
    if shutil.which("qemu-system-x86_64") is None or not os.path.exists(
        "/usr/share/qemu/vhost-user/50-qemu-gpu.json"
    ):
        pytest.skip("qemu-system-x86 and qemu-system-gui (vhost-user-gpu) are not installed")
    tree.data.append(tree.root.__class__("/usr/share"))
    d = Daemon(bus, tree)
    try:
        r = subprocess.run(
            [
                sys.executable,
                str(REPO / "examples" / "vm_manager.py"),
                "--address",
                bus.address,
                "--seconds",
                "3",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=tree.env(),
            check=False,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert "using 50-qemu-gpu.json: /usr/lib/qemu/vhost-user-gpu" in r.stdout, r.stdout
        assert "QEMU exited with 0; backend stopped" in r.stdout, r.stdout + r.stderr
        d.assert_clean_log()
    finally:
        d.stop()
