"""A booted Linux guest reads and writes an unprivileged caller's image file through Debian's
qemu-storage-daemon, which the SYSTEM service spawned from an adapter descriptor (issue 15
items 1 and 2).

qemu-storage-daemon follows none of the backend conventions (no descriptor, no
``--print-capabilities``, no ``--fd``): examples/adapters/50-qemu-storage-daemon-blk.json
states its capabilities and builds ``--blockdev driver=file,...,filename={blk-file} --export
type=vhost-user-blk,...,addr.type=fd,addr.str={fd}``. The admin installs it in the data tier.
The caller is uid 65534 with no login session; the real polkitd (tests/test_polkit_real.py)
grants it `org.vhostuserd.spawn` for that descriptor only with the detail `blk-file` = its own
image, mode 0600. As itself it runs `vhostuserctl --address SYSBUS spawn 50-qsd-blk.json -o
blk-file=IMG --listen SOCK` and QEMU on that socket. The guest reads the host's token from
the start of /dev/vda and writes its own at byte 4096, which the host then reads from the
file. An image path with a ',' (which would add an option to qemu-storage-daemon's
``--blockdev``) is InvalidOption before polkit is asked.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import guest
import pytest
from busutil import VHOSTUSERCTL, PrivateBus, Tree, wait_for
from helpers_auth import NOBODY, Callers, as_nobody, nobody_workdir, system_daemon
from helpers_spawn import alive, gone, ids, status
from test_polkit_real import polkitd  # noqa: F401 - the real polkitd, a fixture

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "adapters" / "50-qemu-storage-daemon-blk.json"
DESCRIPTOR = "50-qsd-blk.json"
QSD = "/usr/bin/qemu-storage-daemon"
OFFSET = 4096

RULE = """
polkit.addRule(function(action, subject) {
    if (action.id === "org.vhostuserd.spawn" && subject.user === "nobody" &&
        action.lookup("descriptor") === "50-qsd-blk.json" && action.lookup("type") === "block" &&
        action.lookup("blk-file") === "@IMAGE@") {
        return polkit.Result.YES;
    }
});
"""

SCRIPT = f"""
[ -b /dev/vda ] || fail "no /dev/vda"
say "host wrote: $(dd if=/dev/vda bs=512 count=1 2>/dev/null | head -n 1)"
echo "$TOKEN written by the guest" | dd of=/dev/vda bs=512 seek={OFFSET // 512} conv=notrunc,sync \
  2>/dev/null || fail "cannot write /dev/vda"
sync
blockdev --flushbufs /dev/vda || fail "flushbufs"
say "back: $(dd if=/dev/vda bs=512 skip={OFFSET // 512} count=1 2>/dev/null | head -n 1)"
pass
"""


@pytest.fixture
def accelerator(request: pytest.FixtureRequest) -> str:
    reason = guest.why_no_qemu()
    if reason:
        pytest.skip(reason)
    if not os.access(QSD, os.X_OK):
        pytest.skip(f"{QSD} is not installed (Debian's qemu-utils)")
    if os.geteuid() != 0:
        pytest.skip("needs root: the system service, polkitd, and a caller of another uid")
    guest.assets()
    return guest.announce(request, guest.accel())


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory uid 65534 can reach: its socket, QEMU's files and its image under run/."""
    yield from nobody_workdir("vhostuserd-guest-blk-")


def test_guest_reads_and_writes_an_unprivileged_callers_image_through_qsd_from_an_adapter(
    sysbus: PrivateBus,
    polkitd: Callable[[str], None],
    tmp_path: Path,
    workdir: Path,  # noqa: F811
    accelerator: str,
) -> None:
    run = workdir / "run"
    image = run / "disk.img"
    host_token = secrets.token_hex(8)
    with open(image, "wb") as f:
        f.write(f"{host_token} from the host\n".encode())
        f.truncate(1 << 20)
    os.chown(image, NOBODY, NOBODY)
    image.chmod(0o600)
    polkitd(RULE.replace("@IMAGE@", str(image)))
    tree_root = tmp_path / "tree"
    tree_root.mkdir()
    tree = Tree.make(tree_root)
    tree.write("data", DESCRIPTOR, json.loads(EXAMPLE.read_text()))
    daemon = system_daemon(sysbus, tree, "--grace-period", "2")
    admin = Callers(sysbus.address)
    mine = guest.assets().readable_by_all(workdir / "assets")
    g = guest.Guest(run, workdir / "initrd", "", kernel=mine.kernel)
    g.token = guest.build_initramfs(workdir / "initrd", SCRIPT, ["virtio_pci", "virtio_blk"])
    os.chmod(workdir / "initrd", 0o644)
    sock = run / "blk.sock"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": "/nonexistent",
        "LANG": "C.UTF-8",
    }
    ctl_log = run / "ctl.log"
    ctl_proc: subprocess.Popen[str] | None = None

    def ctl(*args: str) -> list[str]:
        return as_nobody(VHOSTUSERCTL, "--address", sysbus.address, "spawn", DESCRIPTOR, *args)

    try:
        # Injection: a ',' would add a --blockdev option; refused, naming the option.
        bad = run / "x,driver=null-co.img"
        refused = subprocess.run(
            ctl("-o", f"blk-file={bad}", "--listen", str(sock)),
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert (
            refused.returncode != 0 and "option 'blk-file': must not contain ','" in refused.stderr
        ), refused
        assert not sock.exists()

        with open(ctl_log, "w") as err:
            ctl_proc = subprocess.Popen(
                ctl("-o", f"blk-file={image}", "--listen", str(sock)),
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
                text=True,
            )
        proc = ctl_proc
        wait_for(
            lambda: "Ctrl-C stops it" in ctl_log.read_text() or proc.poll() is not None,
            "vhostuserctl to serve the socket",
            60,
        )
        assert proc.poll() is None, f"{ctl_log.read_text()}\n{daemon.log()[-3000:]}"
        [backend] = admin(0).backends()
        assert backend["descriptor"] == DESCRIPTOR and backend["owner_uid"] == NOBODY
        assert backend["argv"] == [
            QSD,
            "--blockdev",
            f"driver=file,node-name=file0,filename={image},read-only=off",
            "--export",
            "type=vhost-user-blk,id=export0,node-name=file0,addr.type=fd,addr.str=3,writable=on",
        ], backend["argv"]
        pid = backend["pid"]
        wait_for(
            lambda: os.readlink(f"/proc/{pid}/exe") == QSD, "the backend to be qemu-storage-daemon"
        )
        st = status(pid)
        assert ids(st["Uid"]) == [NOBODY] * 4 and ids(st["Gid"]) == [NOBODY] * 4, st

        g.popen(
            as_nobody(
                *g.argv(
                    "-chardev",
                    f"socket,id=blk,path={sock}",
                    "-device",
                    "vhost-user-blk-pci,chardev=blk",
                )
            ),
            env=env,
        )
        assert g.wait_result() == "pass", g.describe()
        # Guest side: it read the host's token from the caller's image.
        assert f"host wrote: {host_token} from the host" in g.lines(), g.describe()
        # Host side: what the guest wrote at 4096 is in the file, written as the caller.
        with open(image, "rb") as f:
            f.seek(OFFSET)
            written = f.read(512).rstrip(b"\0")
        assert written == f"{g.token} written by the guest\n".encode(), (written, g.describe())
        assert os.stat(image).st_uid == NOBODY
        os.killpg(proc.pid, signal.SIGTERM)  # vhostuserctl stops its backend and exits
        proc.wait(30)
        wait_for(lambda: gone(pid), "qemu-storage-daemon to be stopped and reaped", 30)
        assert not sock.exists(), "vhostuserctl removes the socket it bound"
    finally:
        g.kill()
        if ctl_proc is not None and ctl_proc.poll() is None:
            os.killpg(ctl_proc.pid, signal.SIGKILL)
            ctl_proc.wait()
        for b in admin(0).backends() if daemon.proc.poll() is None else []:
            if alive(b["pid"]):
                os.kill(b["pid"], signal.SIGKILL)
        admin.close()
        daemon.stop()
