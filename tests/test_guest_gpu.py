"""A booted Linux guest draws on the vhost-user-gpu that the system service spawned for an
unprivileged caller.

The caller is uid 65534, with no login session; the real polkitd (in a private mount
namespace with our actions and one rule, as in tests/test_polkit_real.py) grants it
`org.vhostuserd.spawn` for Debian's 50-qemu-gpu.json. It runs, as itself, what a VM manager
would: `vhostuserctl --address SYSBUS spawn 50-qemu-gpu.json --exec -- QEMU ... -chardev
socket,id=gpu,fd={fd} -device vhost-user-gpu-pci,chardev=gpu`. The guest (tests/guest/)
loads virtio-gpu, checks that /sys/class/drm/card0 is the virtio GPU, clears its console
and then writes lines of text on it; a QMP screendump of the cleared screen and one of the
text are compared pixel by pixel, in the rows the text went to and below them.

QEMU 7.2 refuses vhost-user-gpu without KVM, so where the system QEMU is older than 8.0
this uses bookworm-backports' QEMU, unpacked by scripts/guest-assets into a private prefix;
the backend is Debian's own vhost-user-gpu either way. Skipped, saying why, without QEMU,
vhost-user-gpu or the means to run polkitd.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import guest
import pytest
from busutil import VHOSTUSERCTL, PrivateBus, RealTree, wait_for
from helpers_auth import NOBODY, Callers, nobody_workdir, system_daemon
from helpers_spawn import alive, gone, proc_stat, status
from test_polkit_real import polkitd  # noqa: F401 - the real polkitd, a fixture

DESCRIPTOR = "50-qemu-gpu.json"
ROWS = 8  # lines of text the guest draws, 16 pixels each with the default 8x16 font

NOBODY_MAY_SPAWN_DEBIANS_GPU = """
polkit.addRule(function(action, subject) {
    if (action.id === "org.vhostuserd.spawn" && subject.user === "nobody" &&
        action.lookup("descriptor") === "50-qemu-gpu.json" && action.lookup("type") === "gpu") {
        return polkit.Result.YES;
    }
});
"""

DRAW = f"""
[ -e /sys/class/drm/card0 ] || fail "no /sys/class/drm/card0"
say "card0 $(cat /sys/class/drm/card0/device/vendor) $(cat /sys/class/drm/card0/device/device)"
[ -e /dev/fb0 ] || fail "virtio-gpu gave no framebuffer"
# The console on the GPU (fbcon on tty1): no cursor, cleared, then ours to draw on.
echo 0 > /sys/class/graphics/fbcon/cursor_blink
printf '\\033[?25l\\033[2J\\033[H' > /dev/tty1
say "cleared"
read -r go
i=0
while [ $i -lt {ROWS} ]; do
  echo "vhostuserd guest $TOKEN line $i ################################" > /dev/tty1
  i=$((i + 1))
done
say "drew"
read -r go
pass
"""


@pytest.fixture
def accelerator(request: pytest.FixtureRequest) -> str:
    reason = guest.why_no_qemu() or guest.why_no_debian_backend(DESCRIPTOR)
    if reason:
        pytest.skip(reason)
    if os.geteuid() != 0:
        pytest.skip("needs root: the system service, polkitd, and a caller of another uid")
    guest.assets()
    return guest.announce(request, guest.accel())


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory uid 65534 can reach and write: its QEMU's QMP socket and screendumps."""
    yield from nobody_workdir("vhostuserd-guest-gpu-")


def test_guest_draws_on_the_vhost_user_gpu_the_system_service_spawned_for_an_unprivileged_caller(
    sysbus: PrivateBus,
    polkitd: Callable[[str], None],
    tmp_path: Path,
    workdir: Path,  # noqa: F811
    accelerator: str,
) -> None:
    polkitd(NOBODY_MAY_SPAWN_DEBIANS_GPU)
    tree_root = tmp_path / "tree"
    tree_root.mkdir()
    tree = RealTree.make(tree_root)
    daemon = system_daemon(sysbus, tree, "--grace-period", "2")
    admin = Callers(sysbus.address)
    run = workdir / "run"
    # The kernel, the initramfs and (where needed) the newer QEMU, where uid 65534 reads them.
    mine = guest.assets().readable_by_all(workdir / "assets")
    qemu, qemu_env = mine.qemu_for_gpu()
    g = guest.Guest(run, workdir / "initrd", "", qemu=qemu, env=qemu_env, kernel=mine.kernel)
    g.token = guest.build_initramfs(workdir / "initrd", DRAW, guest.MODULES_GPU)
    os.chmod(workdir / "initrd", 0o644)
    argv = g.argv("-chardev", "socket,id=gpu,fd={fd}", "-device", "vhost-user-gpu-pci,chardev=gpu")
    try:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": "/nonexistent",
            "LANG": "C.UTF-8",
        }
        proc = g.popen(
            [
                "setpriv",
                f"--reuid={NOBODY}",
                f"--regid={NOBODY}",
                "--clear-groups",
                VHOSTUSERCTL,
                "--address",
                sysbus.address,
                "spawn",
                DESCRIPTOR,
                "--exec",
                "--",
                *argv,
            ],
            env=env,
        )
        # vhostuserctl's own messages go to its stderr, as QEMU's do: qemu.err.

        def started() -> int | None:
            m = re.search(r"\(pid (\d+)\)", g.stderr())
            if proc.poll() is not None:
                raise AssertionError(
                    f"vhostuserctl exited with {proc.returncode}: {g.stderr()}\n"
                    f"{daemon.log()[-3000:]}"
                )
            return int(m.group(1)) if m else None

        qemu_pid = wait_for(started, "vhostuserctl to start QEMU", 30)
        [backend] = admin(0).backends()
        binary = guest.debian_binary(DESCRIPTOR)
        # Host side: the broker started Debian's backend, as the caller, for the caller.
        assert backend["descriptor"] == DESCRIPTOR and backend["argv"] == [binary, "--fd=3"]
        assert backend["owner_uid"] == NOBODY
        st = status(backend["pid"])
        assert st["Uid"].split() == [str(NOBODY)] * 4 and st["NoNewPrivs"].strip() == "1"
        pst = proc_stat(backend["pid"])
        assert pst is not None and pst[2] == daemon.proc.pid, "the backend is the daemon's child"
        assert status(qemu_pid)["Uid"].split()[0] == str(NOBODY), "QEMU runs as the caller"

        # Guest side: the DRM device is the virtio GPU (PCI 1af4:1050), and what it draws
        # reaches QEMU's display through the backend.
        g.wait_line(r"^GUEST: cleared")
        assert "card0 0x1af4 0x1050" in g.lines(), g.describe()
        g.qmp("screendump", filename=str(run / "cleared.ppm"))
        g.send("go")
        g.wait_line(r"^GUEST: drew")
        g.qmp("screendump", filename=str(run / "text.ppm"))
        g.send("go")
        assert g.wait_result() == "pass"
        before, after = guest.read_ppm(run / "cleared.ppm"), guest.read_ppm(run / "text.ppm")
        width, height, _ = before
        assert width >= 640 and height >= 400, (width, height)
        text_rows = (0, 0, width, ROWS * 16)
        below = (0, ROWS * 16 + 16, width, height - ROWS * 16 - 16)
        drawn = guest.changed_pixels(before, after, text_rows)
        # About 60 characters a line, each some 20-40 lit pixels of its 8x16 cell.
        assert drawn > ROWS * 60 * 10, f"only {drawn} pixels changed where the guest wrote text"
        assert guest.changed_pixels(before, after, below) == 0, "pixels changed below the text"

        # The guest powered off: QEMU exits 0, and so does vhost-user-gpu as its front-end
        # closes the socket. vhostuserctl returns QEMU's 0 whichever exit it saw first (a
        # backend that exits 0 finished, it did not fail), and says both statuses.
        rc = proc.wait(30)
        last = g.stderr().rstrip().splitlines()[-1]
        qemu_done = f"{argv[0]} exited with status 0; backend {backend['id']} "
        assert last.startswith(qemu_done), g.stderr()
        assert (rc, last[len(qemu_done) :]) in ((0, "stopped"), (0, "exited with status 0")), (
            g.stderr()
        )
        wait_for(lambda: gone(backend["pid"]), "vhost-user-gpu to be stopped and reaped", 20)
        daemon.assert_clean_log()
    finally:
        g.kill()
        if g.proc is not None and g.proc.poll() is None:
            os.killpg(g.proc.pid, signal.SIGKILL)
        for b in admin(0).backends() if daemon.proc.poll() is None else []:
            if alive(b["pid"]):
                os.kill(b["pid"], signal.SIGKILL)
        admin.close()
        daemon.stop()
