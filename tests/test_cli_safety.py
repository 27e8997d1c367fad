"""What ``vhostuserctl`` must never do to a user, and the dead ends it must not leave (issue 11,
points 1-8), against the real daemon on a private bus with fake backends as real processes.

- ``spawn --listen PATH`` replaces only a socket, only a stale one, only with ``--replace``;
  it never connects to a socket something listens on (a vhost-user backend takes any
  connection as its front-end, and exits when it closes). Which paths it refuses, and how it
  says so, is `listen_socket`'s rule, tested on real paths in tests/test_cli_listen_rules.py;
  here the CLI against the daemon, and a failed spawn that removes the socket it bound.
- ``check --probe`` copes with files of different tiers sharing a name.
- an unknown backend id is NotFound ("no backend 999"), in the CLI and in the client.
- a broken file that hides a name is named by ``list`` and ``show``.
- a backend that dies under ``spawn --exec`` is reported with its status and log tail, and
  the command exits non-zero.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from busutil import (
    VHOSTUSERCTL,
    Daemon,
    PrivateBus,
    Tree,
    ctl,
    descriptor,
    run,
    stop_process,
    wait_for,
)
from helpers_spawn import install, kill_marked, wait_none_marked

from vhostuserd.client import BrokerClient, NotFound

StartDaemon = Callable[..., Daemon]
NOT_FOUND = "org.vhostuserd.Broker1.Error.NotFound"


@pytest.fixture(autouse=True)
def no_backend_left(tree: Tree) -> Iterator[None]:
    """Detached backends outlive their daemon: a failing test must not leave one behind."""
    yield
    kill_marked(tree)


def one_line(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 1, (r.args, r.returncode, r.stdout, r.stderr)
    assert r.stdout == "", r.stdout
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vhostuserctl: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def backends(bus: PrivateBus, tree: Tree) -> list[dict[str, object]]:
    r = ctl(bus, tree, "--json", "backends")
    assert r.returncode == 0, r.stderr
    items: list[dict[str, object]] = json.loads(r.stdout)
    return items


# ---------------------------------------------------------------- 1, 2, 8: --listen PATH


def test_spawn_listen_replaces_a_stale_socket_only_when_asked(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    fake = install(tree, "honours_sigterm", "fs", short="fs")
    start_daemon()
    path = tree.root / "stale.sock"
    old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old.bind(str(path))
    old.close()  # a socket file nothing listens on, as a killed run leaves behind
    line = one_line(ctl(bus, tree, "spawn", fake.name, "--listen", str(path), "--detach"))
    assert "--replace" in line and "nothing listens" in line, line
    r = ctl(bus, tree, "spawn", fake.name, "--listen", str(path), "--detach", "--replace")
    assert r.returncode == 0, r.stderr
    backend_id = r.stdout.strip()
    assert [b["id"] for b in backends(bus, tree)] == [backend_id]
    # Now the socket is live (the backend listens on it): another spawn is refused.
    line = one_line(
        ctl(bus, tree, "spawn", fake.name, "--listen", str(path), "--detach", "--replace")
    )
    assert "is listening" in line, line
    assert [b["state"] for b in backends(bus, tree)] == ["running"]
    stop = ctl(bus, tree, "stop", backend_id)
    assert stop.returncode == 0, stop.stderr
    assert f"backend {backend_id} ({fake.name}) stopped" in stop.stdout, stop.stdout
    wait_none_marked(tree)


# ---------------------------------------------------------------- 3: check --probe, shared names


def test_check_probe_copes_with_files_of_different_tiers_sharing_a_name(tree: Tree) -> None:
    good = install(tree, "honours_sigterm", "gpu", ["virgl"], short="gpu", write_descriptor=False)
    tree.write("data", "50-gpu.json", descriptor("gpu", str(good.path)))
    tree.write("sysconf", "50-gpu.json", descriptor("gpu", "/nonexistent/gpu"))
    tree.write("user", "50-gpu.json", descriptor("gpu", str(good.path)))
    r = ctl(None, tree, "check", "--probe", "--sysconfdir", str(tree.sysconfdir))
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 1, (r.stdout, r.stderr)  # the sysconf file's binary does not exist
    lines = r.stdout.splitlines()
    sysconf = str(tree.dir("sysconf") / "50-gpu.json")
    assert any(x.startswith(f"{sysconf}: error: probe failed: missing-binary") for x in lines), (
        r.stdout
    )
    assert f"{tree.dir('user') / '50-gpu.json'}: ok" in lines, r.stdout
    assert (
        f"{tree.dir('data') / '50-gpu.json'}: ok (shadowed by {tree.dir('user') / '50-gpu.json'})"
        in lines
    )


# ---------------------------------------------------------------- 4: unknown backend ids


def test_an_unknown_backend_id_is_not_found_in_the_cli_and_the_client(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    d = start_daemon()
    for verb in ("stop", "log"):
        assert one_line(ctl(bus, tree, verb, "999")) == "vhostuserctl: no backend 999"
        r = ctl(bus, tree, "--json", verb, "999")
        assert (r.returncode, r.stdout) == (1, "")
        assert json.loads(r.stderr) == {"error": NOT_FOUND, "message": "no backend 999"}

    async def main() -> None:
        async with await BrokerClient.connect("address", bus.address) as c:
            for call in (c.stop, c.get_log, c.backend):
                with pytest.raises(NotFound, match="^no backend 999$") as e:
                    await call("999")
                assert e.value.name == NOT_FOUND

    run(main())
    d.assert_clean_log()


# ---------------------------------------------------------------- 5: a broken file hides a name


def _hidden_by_a_broken_file(tree: Tree) -> Path:
    tree.write("data", "50-qemu-gpu.json", descriptor("gpu", description="the system's"))
    tree.write("data", "60-input.json", descriptor("input"))
    return tree.write("user", "50-qemu-gpu.json", b'{"type": "gpu", "bin')  # truncated


def _list_and_show_name(broken: Path, tree: Tree, bus: PrivateBus | None, *where: str) -> None:
    r = ctl(bus, tree, "list", *where)
    assert r.returncode == 0, r.stderr
    assert "50-qemu-gpu.json" not in r.stdout and "60-input.json" in r.stdout
    notes = [
        x
        for x in r.stderr.splitlines()
        if x.startswith("vhostuserctl: 50-qemu-gpu.json: not listed")
    ]
    assert len(notes) == 1 and str(broken) in notes[0] and "broken" in notes[0], r.stderr
    line = one_line(ctl(bus, tree, "show", "50-qemu-gpu.json", *where))
    assert str(broken) in line and "broken" in line and "hides the name" in line, line
    r = ctl(bus, tree, "--json", "show", "50-qemu-gpu.json", *where)
    assert r.returncode == 1 and json.loads(r.stderr)["error"] == NOT_FOUND


def test_list_and_show_name_the_broken_file_that_hides_a_descriptor(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    broken = _hidden_by_a_broken_file(tree)
    start_daemon()
    _list_and_show_name(broken, tree, bus)


def test_list_and_show_offline_name_the_broken_file_that_hides_a_descriptor(tree: Tree) -> None:
    broken = _hidden_by_a_broken_file(tree)
    _list_and_show_name(broken, tree, None, "--offline", "--sysconfdir", str(tree.sysconfdir))


# ---------------------------------------------------------------- 6: a backend dying under --exec


def test_spawn_exec_reports_a_backend_that_dies_under_the_command_and_fails(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    fake = install(tree, "chatty", "gpu", short="chatty", lines=4)
    d = start_daemon()
    # The command outlives the backend, and exits 0 on SIGTERM: only the backend failed.
    code = (
        "import signal, sys; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); signal.pause()"
    )
    cmd = [sys.executable, "-c", code]
    err = tree.root / "ctl.err"
    with open(err, "w") as f:
        proc = subprocess.Popen(
            [VHOSTUSERCTL, "--address", bus.address, "spawn", fake.name, "--exec", "--", *cmd],
            env=tree.env(),
            stdout=subprocess.DEVNULL,
            stderr=f,
            stdin=subprocess.DEVNULL,
        )
    try:
        started = wait_for(
            lambda: re.search(r"backend (\d+) started; .*\(pid (\d+)\)", err.read_text()),
            lambda: f"the command to start: {err.read_text()}",
        )
        backend_id, cmd_pid = started.group(1), int(started.group(2))
        log = wait_for(
            lambda: (
                (r := ctl(bus, tree, "log", backend_id)).returncode == 0
                and "chatty: END OF OUTPUT" in r.stdout
            ),
            "the backend's output",
        )
        assert log
        (b,) = backends(bus, tree)
        os.kill(int(str(b["pid"])), signal.SIGKILL)  # the backend crashes mid-run
        report = wait_for(
            lambda: (
                "killed by signal 9 (SIGKILL) while" in err.read_text()
                and "chatty: END OF OUTPUT" in err.read_text()
                and err.read_text()
            ),
            lambda: f"the CLI's report of the crash: {err.read_text()}",
        )
        assert f"backend {backend_id} killed by signal 9 (SIGKILL)" in report, report
        assert proc.poll() is None, "the command goes on: the CLI waits for it"
        os.kill(cmd_pid, signal.SIGTERM)
        assert proc.wait(20) == 1, err.read_text()
        text = err.read_text()
        assert "Traceback" not in text and "stopped" not in text.splitlines()[-1], text
    finally:
        stop_process(proc)
    d.assert_clean_log()


def test_spawn_exec_a_backend_that_exits_0_as_its_front_end_goes_is_no_failure(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    # As vhost-user backends do when QEMU exits: which exit the CLI sees first is a race.
    fake = install(
        tree, "exits", "gpu", short="done", delay=1, status=0, message="done: front-end gone"
    )
    d = start_daemon()
    cmd = [
        sys.executable,
        "-c",
        "import os\nwhile os.read(3, 4096): pass",
    ]  # until the backend's end closes
    r = ctl(bus, tree, "spawn", fake.name, "--exec", "--", *cmd)
    assert r.returncode == 0, r.stderr
    last = r.stderr.splitlines()[-1]
    assert last.startswith(f"{sys.executable} exited with status 0; backend "), r.stderr
    assert last.endswith((" stopped", " exited with status 0")), r.stderr
    assert f"while {sys.executable} ran" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    d.assert_clean_log()


def test_a_failed_spawn_removes_the_socket_it_bound(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    start_daemon()
    tree.write("data", "50-fs.json", descriptor("fs", "/nonexistent/virtiofsd"))
    path = tree.root / "fs.sock"
    r = ctl(bus, tree, "spawn", "50-fs.json", "--listen", str(path), "--detach")
    assert r.returncode == 1, r
    assert not path.exists() and not Path(f"{path}").is_socket()
