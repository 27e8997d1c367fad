"""A booted Linux guest uses the virtiofsd that vhostuserd spawned (the session service).

The backend is Debian's virtiofsd, found through its Debian descriptor and started by the
daemon for `vhostuserctl spawn 50-qemu-virtiofsd.json -o shared-dir=DIR --listen SOCK`; the
test only runs QEMU on that socket. The guest (tests/guest/: a stock Debian kernel and a
busybox initramfs, TCG unless hardware KVM is there) mounts the tag, and each result is
checked on both sides: what the guest printed on its console and what the host finds in the
shared directory and in the broker's records.

Debian's virtiofsd runs only as root, so these run as root (the unprivileged caller is the
vhost-user-gpu case, tests/test_guest_gpu.py). Skipped, saying why, without QEMU.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import guest
import pytest
from busutil import VHOSTUSERCTL, Daemon, PrivateBus, RealTree, Tree, wait_for
from helpers_spawn import alive, gone, kill_marked, proc_stat

DESCRIPTOR = "50-qemu-virtiofsd.json"
TAG = "share"


@pytest.fixture(scope="module")
def accelerator(request: pytest.FixtureRequest) -> str:
    reason = guest.why_no_qemu() or guest.why_no_debian_backend(DESCRIPTOR)
    if reason:
        pytest.skip(reason)
    if os.geteuid() != 0:
        pytest.skip("Debian's virtiofsd runs only as root")
    guest.assets()  # fetches them on a machine where scripts/setup did not
    return guest.announce(request, guest.accel())


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


def ctl(bus: PrivateBus, tree: Tree, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [VHOSTUSERCTL, "--address", bus.address, *args],
        env=tree.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def backends(bus: PrivateBus, tree: Tree) -> list[dict[str, Any]]:
    r = ctl(bus, tree, "--json", "backends")
    assert r.returncode == 0, r.stderr
    items: list[dict[str, Any]] = json.loads(r.stdout)
    return items


def running(bus: PrivateBus, tree: Tree) -> list[dict[str, Any]]:
    return [b for b in backends(bus, tree) if b["state"] == "running"]


class Listen:
    """`vhostuserctl spawn 50-qemu-virtiofsd.json -o shared-dir=DIR --listen SOCK [--detach]`."""

    def __init__(self, bus: PrivateBus, tree: Tree, shared: Path, sock: Path, *extra: str) -> None:
        self.log = tree.root / f"ctl-{secrets.token_hex(3)}.log"
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
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
                    *extra,
                ],
                env=tree.env(),
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,
                text=True,
            )

    def text(self) -> str:
        return self.log.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


def fs_device(sock: Path) -> list[str]:
    return [
        "-chardev",
        f"socket,id=fs,path={sock}",
        "-device",
        f"vhost-user-fs-pci,chardev=fs,tag={TAG}",
    ]


MOUNT_READ_WRITE = f"""
mount -t virtiofs {TAG} /mnt || fail "mount -t virtiofs {TAG}"
say "host wrote: $(cat /mnt/from-host.txt)"
echo "$TOKEN written by the guest" > /mnt/from-guest.txt || fail "cannot write to the share"
mkdir /mnt/guest-dir || fail "cannot mkdir on the share"
umount /mnt || fail "umount"
pass
"""


def test_guest_mounts_the_share_of_the_virtiofsd_vhostuserctl_spawned_and_writes_back(
    bus: PrivateBus, real_tree: RealTree, daemon: Daemon, tmp_path: Path, accelerator: str
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    host_token = secrets.token_hex(8)
    (shared / "from-host.txt").write_text(f"{host_token}\n")
    sock = tmp_path / "fs.sock"
    ctl_run = Listen(bus, real_tree, shared, sock)
    g = guest.Guest(
        tmp_path,
        tmp_path / "initrd",
        guest.build_initramfs(tmp_path / "initrd", MOUNT_READ_WRITE, guest.MODULES_FS),
    )
    try:
        wait_for(
            lambda: "Ctrl-C stops it" in ctl_run.text() or ctl_run.proc.poll() is not None,
            "vhostuserctl to serve the socket",
        )
        assert ctl_run.proc.poll() is None, ctl_run.text()
        [backend] = running(bus, real_tree)
        # The daemon started it, with the share as Debian's virtiofsd spells it.
        assert backend["descriptor"] == DESCRIPTOR
        assert backend["argv"][1:] in (
            ["--fd=3", f"--shared-dir={shared}"],
            ["--fd=3", "-o", f"source={shared}"],
        )
        st = proc_stat(backend["pid"])
        assert st is not None and st[2] == daemon.proc.pid, "virtiofsd is the daemon's child"

        g.start(*fs_device(sock))
        assert g.wait_result() == "pass"
        # Guest side: it read what the host wrote.
        assert f"host wrote: {host_token}" in g.lines(), g.describe()
        # Host side: what the guest wrote, through the backend the broker started.
        assert (shared / "from-guest.txt").read_text() == f"{g.token} written by the guest\n"
        assert (shared / "guest-dir").is_dir()
        # QEMU gone, virtiofsd exits; vhostuserctl sees it, says so, and removes its socket.
        wait_for(
            lambda: not alive(backend["pid"]), "virtiofsd to exit after the guest powered off", 20
        )
        assert ctl_run.proc.wait(20) == 1 and "backend exited" in ctl_run.text(), ctl_run.text()
        assert not sock.exists()
        wait_for(lambda: gone(backend["pid"]), "virtiofsd to be reaped")
        daemon.assert_clean_log()
    finally:
        g.kill()
        ctl_run.kill()


LOOP = f"""
mount -t virtiofs {TAG} /mnt || fail "mount -t virtiofs {TAG}"
say "mounted"
# Whether a process still runs (gone or a zombie: it is done); its state letter on stdout.
running() {{ s=$(sed -n 's/^State:[[:space:]]*\\([A-Z]\\).*/\\1/p' /proc/$1/status 2>/dev/null); echo "$s"; [ -n "$s" ] && [ "$s" != Z ]; }}
while read -r cmd arg; do
  case "$cmd" in
    read)
      # A new name each time: a lookup the backend must answer, never the guest's cache.
      # In the background, given 5 s: a FUSE request already in the virtqueue waits for its
      # answer forever (Linux 6.1 has no FUSE request timeout, and a virtiofs connection
      # cannot be aborted through fusectl), and this loop must go on answering.
      cat "/mnt/$arg" >/tmp/out 2>&1 &
      pid=$!
      i=0
      while running $pid >/dev/null && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
      if st=$(running $pid); then
        say "read $arg: no answer in 5 s (cat in state $st)"
      elif wait $pid; then say "read $arg: $(cat /tmp/out)"
      else say "read $arg failed: $(cat /tmp/out)"; fi ;;
    write)
      if echo "$TOKEN $arg" > "/mnt/$arg"; then say "wrote $arg"; else say "write $arg failed"; fi ;;
    done) pass ;;
  esac
done
fail "the console closed"
"""


def test_guest_keeps_its_share_across_a_sigkilled_daemon_and_its_next_access_times_out_once_the_backend_stops(
    bus: PrivateBus, real_tree: RealTree, tmp_path: Path, accelerator: str
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    sock = tmp_path / "fs.sock"
    state = ("--grace-period", "2")  # the default --state-dir, in the tree: kill_marked cleans up
    first = Daemon(bus, real_tree, *state)
    second: Daemon | None = None
    # --detach: the backend outlives this command (a VM manager's long-lived backend).
    ctl_run = Listen(bus, real_tree, shared, sock, "--detach")
    g = guest.Guest(
        tmp_path,
        tmp_path / "initrd",
        guest.build_initramfs(tmp_path / "initrd", LOOP, guest.MODULES_FS),
    )
    try:
        assert ctl_run.proc.wait(30) == 0, ctl_run.text()
        assert ctl_run.proc.stdout is not None
        backend_id = ctl_run.proc.stdout.read().strip()
        [backend] = running(bus, real_tree)
        assert backend["id"] == backend_id and backend["detached"]

        g.start(*fs_device(sock))
        g.wait_line(r"^GUEST: mounted")

        def guest_reads(name: str, content: str) -> None:
            (shared / name).write_text(content + "\n")
            g.send(f"read {name}")
            g.wait_line(rf"^GUEST: read {name}(: | failed)")
            assert f"read {name}: {content}" in g.lines(), g.describe()

        guest_reads("before", "token-before")

        # The daemon dies hard; the guest's share does not notice.
        first.stop(signal.SIGKILL)
        assert alive(backend["pid"])
        guest_reads("while-down", "token-while-down")

        # A new daemon re-adopts the backend, which keeps serving the guest both ways.
        second = Daemon(bus, real_tree, *state)
        [again] = wait_for(lambda: running(bus, real_tree), "the backend to be re-adopted")
        assert (again["id"], again["pid"]) == (backend_id, backend["pid"])
        guest_reads("after", "token-after")
        g.send("write from-guest")
        g.wait_line(r"^GUEST: (wrote|write) from-guest")
        assert "wrote from-guest" in g.lines(), g.describe()
        assert (shared / "from-guest").read_text() == f"{g.token} from-guest\n"

        # Stopped through the new daemon: the backend goes, and the guest's next access gets
        # no answer (or an error), which the guest sees and reports, instead of hanging the
        # test.
        r = ctl(bus, real_tree, "stop", backend_id)
        assert r.returncode == 0, r.stderr
        wait_for(lambda: gone(backend["pid"]), "virtiofsd to be stopped and reaped")
        (shared / "too-late").write_text("never read\n")
        g.send("read too-late")
        m = g.wait_line(r"^GUEST: read too-late(: no answer in 5 s|: | failed)")
        assert m.group(1) in (": no answer in 5 s", " failed"), g.describe()
        g.send("done")  # the guest itself still answers
        assert g.wait_marker() == "pass"
        # It cannot power off (shutting the device down waits for that request): QEMU quits.
        g.qmp("quit")
        assert g.wait_exit() == 0
        assert running(bus, real_tree) == []
        second.assert_clean_log()
    finally:
        g.kill()
        ctl_run.kill()
        if second is not None:
            second.stop()
        first.stop(signal.SIGKILL)
