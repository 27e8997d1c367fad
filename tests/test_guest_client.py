"""The Python client path: examples/boot_guest.py, a VM manager written against
`vhostuserd.client`, boots a real guest (tests/guest/) whose virtio-fs share is served by
the backend the broker resolved and spawned. Root, as Debian's virtiofsd needs; skipped,
saying why, without QEMU.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import guest
import pytest
from busutil import REPO, VHOSTUSERCTL, Daemon, PrivateBus, RealTree
from helpers_spawn import kill_marked

DESCRIPTOR = "50-qemu-virtiofsd.json"

GUEST = """
mount -t virtiofs share /mnt || fail "mount -t virtiofs share"
say "host wrote: $(cat /mnt/from-host.txt)"
echo "$TOKEN" > /mnt/from-guest.txt || fail "cannot write to the share"
umount /mnt
pass
"""


@pytest.fixture
def accelerator(request: pytest.FixtureRequest) -> str:
    reason = guest.why_no_qemu() or guest.why_no_debian_backend(DESCRIPTOR)
    if reason:
        pytest.skip(reason)
    if os.geteuid() != 0:
        pytest.skip("Debian's virtiofsd runs only as root")
    guest.assets()
    return guest.announce(request, guest.accel())


def test_boot_guest_example_boots_a_guest_on_the_share_of_the_backend_the_broker_spawned(
    bus: PrivateBus, tmp_path: Path, accelerator: str
) -> None:
    tree = RealTree.make(tmp_path / "tree")
    daemon = Daemon(bus, tree)
    shared = tmp_path / "shared"
    shared.mkdir()
    host_token = secrets.token_hex(8)
    (shared / "from-host.txt").write_text(host_token + "\n")
    token = guest.build_initramfs(tmp_path / "initrd", GUEST, guest.MODULES_FS)
    try:
        r = subprocess.run(
            [
                sys.executable,
                str(REPO / "examples" / "boot_guest.py"),
                "--address",
                bus.address,
                "--kernel",
                str(guest.assets().kernel),
                "--initrd",
                str(tmp_path / "initrd"),
                "--share",
                str(shared),
                "--accel",
                accelerator,
                "--seconds",
                str(guest.BOOT_TIMEOUT),
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=guest.BOOT_TIMEOUT + 60,
            env=tree.env(),
            check=False,
        )
        out = f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
        assert r.returncode == 0, out
        # The broker chose Debian's virtiofsd and started it with the share.
        binary = guest.debian_binary(DESCRIPTOR)
        assert f"using {DESCRIPTOR}: {binary}" in r.stderr, out
        # Guest side (its console is the example's stdout), then host side.
        assert f"GUEST-PASS {token}" in r.stdout, out
        assert f"GUEST: host wrote: {host_token}" in r.stdout, out
        assert (shared / "from-guest.txt").read_text() == token + "\n"
        assert "QEMU exited with 0; backend" in r.stderr, out
        listed = subprocess.run(
            [VHOSTUSERCTL, "--address", bus.address, "--json", "backends"],
            env=tree.env(),
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert [b for b in json.loads(listed.stdout) if b["state"] == "running"] == []
        daemon.assert_clean_log()
    finally:
        daemon.stop()
        kill_marked(tree)
