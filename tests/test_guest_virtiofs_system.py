"""A booted Linux guest shares a folder of an unprivileged caller through the virtiofsd the
SYSTEM service spawned for it, in a user namespace whose root is the caller (issue 13).

The caller is uid 65534 with no login session; the real polkitd (tests/test_polkit_real.py)
grants it `org.vhostuserd.spawn` for Debian's 50-qemu-virtiofsd.json only with the detail
`idmap` = `caller`. As itself it runs `vhostuserctl --address SYSBUS spawn
50-qemu-virtiofsd.json -o shared-dir=DIR --listen SOCK` and then QEMU on that socket. The
share is the caller's, mode 0700, so only the caller's ids (or host root's capabilities)
reach it. The guest reads the host's file, writes one back and makes a directory; a file of
host root's in the share stays unreadable to the guest's root, and the guest cannot give a
file to a uid the namespace does not map. On the host the new file and directory belong to
the caller's uid and gid.

Debian 12's virtiofsd cannot run as a plain non-root uid (docs/threat-model.md, "fs backends
in a user namespace"); this is the path that makes it work.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import guest
import pytest
from busutil import VHOSTUSERCTL, PrivateBus, RealTree, wait_for
from helpers_auth import NOBODY, Callers, as_nobody, nobody_workdir, system_daemon
from helpers_spawn import alive, gone, ids, status
from test_polkit_real import polkitd  # noqa: F401 - the real polkitd, a fixture

DESCRIPTOR = "50-qemu-virtiofsd.json"
TAG = "share"

NOBODY_MAY_SHARE_AS_ITSELF = """
polkit.addRule(function(action, subject) {
    if (action.id === "org.vhostuserd.spawn" && subject.user === "nobody" &&
        action.lookup("descriptor") === "50-qemu-virtiofsd.json" &&
        action.lookup("type") === "fs" && action.lookup("idmap") === "caller") {
        return polkit.Result.YES;
    }
});
"""

SCRIPT = f"""
mount -t virtiofs {TAG} /mnt || fail "mount -t virtiofs {TAG}"
say "host wrote: $(cat /mnt/from-host.txt)"
echo "$TOKEN written by the guest" > /mnt/from-guest.txt || fail "cannot write to the share"
mkdir /mnt/guest-dir || fail "cannot mkdir on the share"
if cat /mnt/root-only.txt >/dev/null 2>&1; then say "root-only: readable"
else say "root-only: denied"; fi
if chown 1000 /mnt/from-guest.txt 2>/dev/null; then say "chown 1000: done"
else say "chown 1000: refused"; fi
say "owner of from-guest.txt: $(stat -c %u:%g /mnt/from-guest.txt)"
umount /mnt || fail "umount"
pass
"""


@pytest.fixture
def accelerator(request: pytest.FixtureRequest) -> str:
    reason = guest.why_no_qemu() or guest.why_no_debian_backend(DESCRIPTOR)
    if reason:
        pytest.skip(reason)
    if os.geteuid() != 0:
        pytest.skip("needs root: the system service, polkitd, and a caller of another uid")
    for tool in ("/usr/bin/unshare", "/usr/bin/nsenter"):
        if not os.access(tool, os.X_OK):
            pytest.skip(f"{tool} is not installed")
    guest.assets()
    return guest.announce(request, guest.accel())


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory uid 65534 can reach: its socket and QEMU's files under run/, its share."""
    yield from nobody_workdir("vhostuserd-guest-fs-")


def test_guest_shares_an_unprivileged_callers_folder_through_the_system_services_virtiofsd(
    sysbus: PrivateBus,
    polkitd: Callable[[str], None],
    tmp_path: Path,
    workdir: Path,  # noqa: F811
    accelerator: str,
) -> None:
    polkitd(NOBODY_MAY_SHARE_AS_ITSELF)
    tree_root = tmp_path / "tree"
    tree_root.mkdir()
    tree = RealTree.make(tree_root)
    daemon = system_daemon(sysbus, tree, "--grace-period", "2")
    admin = Callers(sysbus.address)
    run = workdir / "run"
    share = workdir / "share"
    share.mkdir(mode=0o700)
    host_token = secrets.token_hex(8)
    (share / "from-host.txt").write_text(f"{host_token}\n")
    os.chown(share / "from-host.txt", NOBODY, NOBODY)
    (share / "root-only.txt").write_text("host root's\n")
    (share / "root-only.txt").chmod(0o600)
    os.chown(share, NOBODY, NOBODY)
    share.chmod(0o700)
    mine = guest.assets().readable_by_all(workdir / "assets")
    g = guest.Guest(run, workdir / "initrd", "", kernel=mine.kernel)
    g.token = guest.build_initramfs(workdir / "initrd", SCRIPT, guest.MODULES_FS)
    os.chmod(workdir / "initrd", 0o644)
    sock = run / "fs.sock"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": "/nonexistent",
        "LANG": "C.UTF-8",
    }
    ctl_log = run / "ctl.log"
    ctl_proc: subprocess.Popen[str] | None = None
    try:
        # No range in /etc/subuid: idmap=subids is refused before polkit is asked. (The rule
        # above grants only idmap=caller: the spawn below works only if polkit sees the detail.)
        refused = subprocess.run(
            as_nobody(
                VHOSTUSERCTL,
                "--address",
                sysbus.address,
                "spawn",
                DESCRIPTOR,
                "-o",
                f"shared-dir={share}",
                "-o",
                "idmap=subids",
                "--listen",
                str(sock),
            ),
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert (
            refused.returncode == 1 and "/etc/subuid has no range for user nobody" in refused.stderr
        ), refused
        assert not sock.exists()

        with open(ctl_log, "w") as err:
            ctl_proc = subprocess.Popen(
                as_nobody(
                    VHOSTUSERCTL,
                    "--address",
                    sysbus.address,
                    "spawn",
                    DESCRIPTOR,
                    "-o",
                    f"shared-dir={share}",
                    "--listen",
                    str(sock),
                ),
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
        pid = backend["pid"]
        binary = guest.debian_binary(DESCRIPTOR)
        wait_for(
            lambda: os.readlink(f"/proc/{pid}/exe") == binary, "the backend to be virtiofsd itself"
        )
        st = status(pid)
        assert ids(st["Uid"]) == [NOBODY] * 4 and ids(st["Gid"]) == [NOBODY] * 4, st
        assert os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")
        assert Path(f"/proc/{pid}/uid_map").read_text().split() == ["0", str(NOBODY), "1"]

        g.popen(
            as_nobody(
                *g.argv(
                    "-chardev",
                    f"socket,id=fs,path={sock}",
                    "-device",
                    f"vhost-user-fs-pci,chardev=fs,tag={TAG}",
                )
            ),
            env=env,
        )
        assert g.wait_result() == "pass", g.describe()
        lines = g.lines()
        # Guest side: it read what the host wrote; host root's file stayed closed to it; the
        # namespace has no uid 1000 to give a file to; its root is the owner of what it made.
        assert f"host wrote: {host_token}" in lines, g.describe()
        assert "root-only: denied" in lines, g.describe()
        assert "chown 1000: refused" in lines, g.describe()
        assert "owner of from-guest.txt: 0:0" in lines, g.describe()
        # Host side: the file and directory the guest made belong to the caller.
        made = share / "from-guest.txt"
        assert made.read_text() == f"{g.token} written by the guest\n"
        for path in (made, share / "guest-dir"):
            st_made = os.stat(path)
            assert (st_made.st_uid, st_made.st_gid) == (NOBODY, NOBODY), (path, st_made)
        assert os.stat(share / "root-only.txt").st_uid == 0
        wait_for(lambda: not alive(pid), "virtiofsd to exit after the guest powered off", 30)
        wait_for(lambda: gone(pid), "virtiofsd to be reaped")
        daemon.assert_clean_log()
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
