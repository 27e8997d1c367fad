"""What an unprivileged local user cannot do through the system service.

Each test runs the real vhostuserd with --system (system tiers, polkit, backends as the
caller) on a private system bus, with python-dbusmock's polkitd template allowing
org.vhostuserd.spawn (so refusals come from the daemon, not from polkit), and drives it from
processes of uid 65534 and of a second unprivileged account. docs/threat-model.md points
at these tests.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from busutil import PrivateBus, Tree, wait_for
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus
from helpers_auth import (
    BACKEND_IFACE,
    MANAGE,
    MANAGER_IFACE,
    NOBODY,
    OTHER_GID,
    OTHER_UID,
    PROPS_IFACE,
    SPAWN,
    DbusmockPolkit,
    Start,
    backend,
    backend_pid,
    descriptor_doc,
    public_dir,
    starts,
    wait_gone,
)
from helpers_spawn import cmdline, ids, status

from vhostuserd.core.descriptors import Capabilities, Descriptor
from vhostuserd.core.options import plan
from vhostuserd.core.optiontable import OptionError


@pytest.fixture
def start(sysbus: PrivateBus, polkit: DbusmockPolkit, tmp_path: Path) -> Iterator[Start]:
    """start(*daemon_args, prepare=None): the system daemon, polkit allowing spawn only."""
    yield from starts(sysbus, polkit, tmp_path)


# ---------------------------------------------------------------- nothing but descriptor names


def test_spawn_takes_a_descriptor_name_never_a_program(
    start: Start, polkit: DbusmockPolkit
) -> None:
    env = start()
    caller = env.callers(NOBODY)
    xml = caller.call(
        "Introspect",
        path="/org/vhostuserd/Broker1",
        interface="org.freedesktop.DBus.Introspectable",
    ).body[0]
    manager = next(
        i for i in ET.fromstring(xml).iter("interface") if i.get("name") == MANAGER_IFACE
    )
    spawn = next(m for m in manager.iter("method") if m.get("name") == "Spawn")
    ins = [
        (a.get("name"), a.get("type"))
        for a in spawn.iter("arg")
        if a.get("direction", "in") == "in"
    ]
    assert [t for _, t in ins] == ["s", "a{sv}", "h"], ins
    # No method anywhere takes something that names a program, its arguments or an identity.
    suspicious = {
        "binary",
        "path",
        "argv",
        "args",
        "command",
        "exec",
        "program",
        "uid",
        "user",
        "env",
    }
    for method in ET.fromstring(xml).iter("method"):
        for arg in method.iter("arg"):
            if arg.get("direction", "in") == "in":
                assert (arg.get("name") or "").lower() not in suspicious, (
                    method.get("name"),
                    arg.attrib,
                )
    gpu_path = str(env.tree.dir("data") / "50-gpu.json")
    for name in (
        "/bin/sh",
        "../../bin/sh",
        "sh",
        "/usr/bin/env",
        gpu_path,
        "../50-gpu.json",
        "50-gpu.json/..",
        "./50-gpu.json",
        "50-gpu",
        "",
    ):
        message = caller.spawn(name).expect_error("NotFound")
        assert "no such descriptor" in message, (name, message)
    assert polkit.checks() == [], "a name that is no descriptor got as far as polkit"
    assert env.running() == [] and env.admin().backends() == []


# ---------------------------------------------------------------- option values stay values


def test_option_values_cannot_add_arguments(start: Start) -> None:
    env = start()
    caller = env.callers(NOBODY)
    # -o source=DIR: a comma would start another -o option.
    message = caller.spawn(
        "50-fs-o.json", {"shared-dir": ("s", "/srv,--socket-path=/tmp/x")}, fd="listen"
    ).expect_error("InvalidOption")
    assert "','" in message, message
    for value in ("/srv\n--socket-path=/tmp/x", "/srv\r--x", "--socket-path=/tmp/x", "srv", ""):
        for name in ("50-fs-o.json", "50-fs.json"):
            caller.spawn(name, {"shared-dir": ("s", value)}, fd="listen").expect_error(
                "InvalidOption"
            )
    # An option name is looked up, never turned into a flag.
    for key in ("--socket-path", "socket-path", "shared-dir=/x --socket-path", "fd", "uid"):
        caller.spawn("50-fs.json", {key: ("s", "/tmp/x")}, fd="listen").expect_error(
            "InvalidOption"
        )
    # NUL: D-Bus strings cannot carry it; the client library refuses to send one (the bus
    # would drop the message and the sender), and the daemon's check is there regardless.
    r = caller.spawn("50-fs-o.json", {"shared-dir": ("s", "/srv\0--x")}, fd="listen")
    assert r.local_error and "NUL" in r.local_error, str(r)
    assert env.running() == []

    # Spaces and a whole flag inside a value: still ONE argv element, both forms.
    value = "/srv --socket-path=/tmp/x -o sandbox=none"
    forms = (("50-fs.json", [f"--shared-dir={value}"]), ("50-fs-o.json", ["-o", f"source={value}"]))
    for name, tail in forms:
        r = caller.spawn(name, {"shared-dir": ("s", value)}, fd="listen")
        assert r.ok, str(r)
        argv = env.admin().prop("Argv", r.body[0], BACKEND_IFACE)
        binary = env.admin().prop("Binary", r.body[0], BACKEND_IFACE)
        assert argv == [binary, "--fd=3", *tail], argv
        # What the process really got: /bin/sh runs the script with exactly these arguments.
        pid = backend_pid(env.admin(), r.body[0])
        assert cmdline(pid) == ["/bin/sh", *argv], cmdline(pid)


def test_option_checker_rejects_nul_and_line_breaks_itself() -> None:
    """The same check without the bus in front of it (a NUL cannot cross D-Bus)."""
    d = Descriptor(
        name="50-fs.json",
        path="/x/50-fs.json",
        tier="data",
        type="fs",
        binary="/usr/bin/x",
        description="",
        tags=(),
    )
    caps = Capabilities(type="fs", features=("separate-options",), json="{}")
    for value in ("/srv\0x", "/srv\nx", "/srv\rx"):
        with pytest.raises(OptionError) as e:
            plan(d, caps, {"shared-dir": ("s", value)})
        assert e.value.kind == "InvalidOption"
    assert plan(d, caps, {"shared-dir": ("s", "/srv x")}).argv[-1] == "--shared-dir=/srv x"


# ---------------------------------------------------------------- no user tier


def test_user_tier_descriptors_are_not_seen_by_the_system_service(start: Start) -> None:
    home = public_dir("vhostuserd-home-")
    try:
        os.chown(home, NOBODY, NOBODY)

        def prepare(tree: Tree, bindir: Path) -> None:
            trusted = str(bindir / "vhost-user-gpu")
            # The daemon's own $XDG_CONFIG_HOME and $HOME/.config (they name the user tier
            # in session mode), and the caller's ~/.config.
            for base in (tree.config_home, tree.root / "home/.config", home / ".config"):
                (base / "qemu/vhost-user").mkdir(parents=True, exist_ok=True)
                (base / "qemu/vhost-user/10-user.json").write_text(
                    __import__("json").dumps(descriptor_doc("gpu", trusted))
                )
            (home / ".config/qemu/vhost-user/10-mine.json").write_text(
                __import__("json").dumps(descriptor_doc("gpu", trusted))
            )

        env = start(prepare=prepare)
        caller = env.callers(
            NOBODY, env={"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}
        )
        search = caller.prop("SearchPath")
        assert search == [
            str(env.tree.dir("sysconf")),
            str(env.tree.dir("data", 0)),
            str(env.tree.dir("data", 1)),
        ], search
        names = {d["name"] for d in caller.descriptors()}
        assert "50-gpu.json" in names and not names & {"10-user.json", "10-mine.json"}, names
        assert {d["tier"] for d in caller.descriptors()} <= {"sysconf", "data"}
        for name in ("10-user.json", "10-mine.json"):
            caller.spawn(name).expect_error("NotFound")
        # 10- would sort first; Resolve still picks a system descriptor.
        r = caller.call("Resolve", "sas", ["gpu", []])
        assert r.ok and r.body[1]["name"] == "50-gpu.json", str(r)
        assert env.running() == []
    finally:
        shutil.rmtree(home, ignore_errors=True)


# ---------------------------------------------------------------- other users' backends


def test_cannot_stop_or_read_another_users_backend(start: Start, polkit: DbusmockPolkit) -> None:
    env = start()
    admin = env.admin()
    roots = admin.spawn("50-gpu.json")
    theirs = env.callers(OTHER_UID).spawn("50-gpu.json")
    assert roots.ok and theirs.ok, (str(roots), str(theirs))
    pids = {backend_pid(admin, roots.body[0]), backend_pid(admin, theirs.body[0])}
    caller = env.callers(NOBODY)
    for path in (roots.body[0], theirs.body[0]):
        assert MANAGE in caller.stop_backend(path).expect_error("NotAuthorized")
        log = caller.call("GetLog", path=path, interface=BACKEND_IFACE)
        assert MANAGE in log.expect_error("NotAuthorized")
    assert caller.backends() == []
    assert set(env.running()) == pids, "a refused Stop stopped a backend"


def test_quota_per_user_holds_even_for_concurrent_spawns(
    start: Start, polkit: DbusmockPolkit
) -> None:
    env = start("--max-backends-per-user", "2")
    fast = {"settle-ms": ("u", 0)}
    a, b = env.callers(NOBODY), env.callers(NOBODY)
    assert a.spawn("50-gpu.json", fast).ok and b.spawn("50-gpu.json", fast).ok
    message = a.spawn("50-gpu.json", fast).expect_error("QuotaExceeded")
    assert str(NOBODY) in message and "2" in message, message
    # The quota is per uid: others are not affected.
    assert env.callers(OTHER_UID).spawn("50-gpu.json", fast).ok
    assert env.admin().spawn("50-gpu.json", fast).ok
    # Stop both: room again. Then a burst: all of it waits for polkit, then gets the
    # answer at once; the quota must still hold (no window between check and start).
    for x in a.backends():
        assert a.stop_backend(x["object"]).ok
    wait_for(
        lambda: not [x for x in a.backends() if x["state"] != "exited"], "the backends to exit"
    )
    polkit.clear_calls()
    polkit.simulate_hang(True)
    sent = [(c, c.send_spawn("50-gpu.json", fast)) for _ in range(4) for c in (a, b)]
    wait_for(lambda: len(polkit.checks()) == len(sent), "the burst to reach polkit")
    polkit.release()
    polkit.simulate_hang(False)
    replies = [c.result(n) for c, n in sent]
    assert sum(r.ok for r in replies) == 2, [str(r) for r in replies]
    assert all(r.ok or r.error == "org.vhostuserd.Broker1.Error.QuotaExceeded" for r in replies)
    mine = [
        x for x in env.admin().backends() if x["owner_uid"] == NOBODY and x["state"] == "running"
    ]
    assert len(mine) == 2, mine


def test_backend_always_runs_as_the_caller(start: Start) -> None:
    env = start()
    for uid, gid in ((NOBODY, NOBODY), (OTHER_UID, OTHER_GID)):
        caller = env.callers(uid)
        for key, value in (
            ("uid", ("u", 0)),
            ("user", ("s", "root")),
            ("run-as", ("s", "0")),
            ("owner_uid", ("u", 0)),
        ):
            caller.spawn("50-gpu.json", {key: value}).expect_error("InvalidOption")
        r = caller.spawn("50-gpu.json")
        assert r.ok, str(r)
        st = status(backend_pid(env.admin(), r.body[0]))
        assert ids(st["Uid"]) == [uid] * 4, (uid, st["Uid"])
        assert ids(st["Gid"]) == [gid] * 4, (uid, st["Gid"])
        assert 0 not in ids(st["Groups"]), st["Groups"]
        assert st["NoNewPrivs"].strip() == "1"
        assert st["CapEff"].strip("0") == "" and st["CapPrm"].strip("0") == "", st
        assert env.admin().prop("OwnerUid", r.body[0], BACKEND_IFACE) == uid


# ---------------------------------------------------------------- untrusted binaries


def test_binaries_a_user_could_replace_are_refused(start: Start, polkit: DbusmockPolkit) -> None:
    dirs: list[Path] = []
    ran = public_dir("vhostuserd-ran-")
    ran.chmod(0o1777)
    cases: dict[str, str] = {}

    def tattler(directory: Path, name: str) -> Path:
        """A backend that leaves a trace when anything runs it, even its probe."""
        path = Path(backend(directory, name, "gpu", []))
        text = path.read_text().replace("#!/bin/sh\n", f"#!/bin/sh\ntouch {ran}/{name}\n", 1)
        path.write_text(text)
        return path

    def prepare(tree: Tree, bindir: Path) -> None:
        def fresh() -> Path:
            d = public_dir("vhostuserd-untrusted-")
            dirs.append(d)
            return d

        p = tattler(fresh(), "world-writable")
        p.chmod(0o757)
        cases["71-world-writable.json"] = str(p)
        p = tattler(fresh(), "owned-by-nobody")
        os.chown(p, NOBODY, NOBODY)
        cases["72-owned-by-nobody.json"] = str(p)
        d = fresh()
        p = tattler(d, "dir-owned-by-nobody")
        os.chown(d, NOBODY, NOBODY)
        cases["73-dir-owned-by-nobody.json"] = str(p)
        d = fresh()
        p = tattler(d, "group-writable-dir")
        d.chmod(0o775)
        cases["74-group-writable-dir.json"] = str(p)
        # A symlink to a trusted binary, lying in a directory its user can write: whoever
        # owns the directory can point it elsewhere between the check and the exec.
        d = fresh()
        trusted = tattler(bindir, "trusted-target")
        os.symlink(trusted, d / "link")
        os.chown(d, NOBODY, NOBODY)
        cases["75-symlink-in-nobodys-dir.json"] = str(d / "link")
        d = fresh()
        os.symlink(trusted, d / "link")
        os.lchown(d / "link", NOBODY, NOBODY)
        cases["76-symlink-owned-by-nobody.json"] = str(d / "link")
        for name, binary in cases.items():
            tree.write("data", name, descriptor_doc("gpu", binary))

    try:
        env = start(prepare=prepare)
        caller = env.callers(NOBODY)
        diagnostics = caller.prop("Diagnostics")
        listed = {d["name"]: d for d in caller.descriptors()}
        for name, binary in cases.items():
            message = caller.spawn(name).expect_error("NotAuthorized")
            assert binary in message and "cannot be trusted" in message, (name, message)
            path = str(env.tree.dir("data") / name)
            errors = [m for p, level, m in diagnostics if p == path and level == "error"]
            assert len(errors) == 1 and binary in errors[0], (name, diagnostics)
            assert listed[name].get("probe_error", "").startswith("untrusted-binary:"), (
                name,
                listed[name],
            )
            caller.call("GetCapabilities", "s", [name]).expect_error("ProbeFailed")
        assert sorted(os.listdir(ran)) == [], f"an untrusted binary ran: {sorted(os.listdir(ran))}"
        assert polkit.checks() == [], "polkit was asked about an untrusted binary"
        # The control: the same kind of script, trusted, runs.
        assert caller.spawn("50-gpu.json").ok
        assert not [d for d in diagnostics if "50-gpu.json" in d[0]], diagnostics
    finally:
        for d in [*dirs, ran]:
            shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------- the daemon cannot be blocked


def test_a_fifo_as_flatpak_info_cannot_block_the_daemon(
    start: Start, polkit: DbusmockPolkit
) -> None:
    """Any user can give a process a root of its own (user namespace + chroot) holding a
    FIFO at /.flatpak-info; the daemon reads that file through /proc/PID/root, as root,
    before asking polkit. Opening a FIFO waits for a writer: the whole daemon would hang."""
    fake_root = public_dir("vhostuserd-fifo-root-")
    fifo = fake_root / ".flatpak-info"
    os.mkfifo(fifo)
    try:
        env = start()
        caller = env.callers(NOBODY)
        r = caller.fake_root(fake_root)
        if not r.ok:
            pytest.skip(
                f"this machine does not allow unprivileged user namespaces: {r.local_error}"
            )
        n = caller.send_spawn("50-gpu.json")
        admin = env.admin()
        # The daemon keeps serving others...
        assert len(admin.call("ListDescriptors", "s", [""], timeout=10).body[0]) == 4
        # ...and the caller gets its answer, with no app id made up from the FIFO.
        r = caller.result(n, timeout=10)
        assert r.ok, str(r)
        [(_action, details, _flags)] = polkit.checks()
        assert "flatpak-app-id" not in details
    finally:
        try:  # unblock a daemon that did block, so that it can be stopped
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        shutil.rmtree(fake_root, ignore_errors=True)


def test_a_backend_left_running_by_a_caller_is_stopped_when_it_leaves(start: Start) -> None:
    """Not detached: a caller cannot leave backends behind by leaving the bus."""
    env = start()
    caller = env.callers(NOBODY)
    r = caller.spawn("50-gpu.json")
    assert r.ok, str(r)
    pid = backend_pid(env.admin(), r.body[0])
    caller.kill()
    wait_gone(pid)
    assert env.running() == []


PRIVATE = {"Argv", "Pid", "Owner", "OwnerUid"}


def _signals_during(address: str, action: Callable[[], None]) -> list[Message]:
    """The daemon's InterfacesAdded and PropertiesChanged broadcasts while ``action`` runs."""

    async def main() -> list[Message]:
        bus = await MessageBus(bus_address=address).connect()
        got: list[Message] = []

        def on(msg: Message) -> bool:
            if msg.message_type is MessageType.SIGNAL and msg.member in (
                "InterfacesAdded",
                "PropertiesChanged",
            ):
                got.append(msg)
            return False

        bus.add_message_handler(on)
        match = "type='signal',sender='org.vhostuserd.Broker1'"
        await bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="AddMatch",
                signature="s",
                body=[match],
            )
        )
        await asyncio.get_running_loop().run_in_executor(None, action)
        # A round trip to the daemon after the action: its signals are in before the reply.
        await bus.call(
            Message(
                destination="org.vhostuserd.Broker1",
                path="/org/vhostuserd/Broker1",
                interface="org.freedesktop.DBus.Peer",
                member="Ping",
            )
        )
        bus.disconnect()
        return got

    return asyncio.run(asyncio.wait_for(main(), 60))


def test_other_users_backends_show_no_argv_pid_or_owner_by_any_route(
    start: Start, polkit: DbusmockPolkit
) -> None:
    env = start()
    admin = env.admin()
    created: list[str] = []

    def spawn_and_stop() -> None:
        r = admin.spawn("50-fs.json", {"shared-dir": ("s", "/root/private-project")}, fd="listen")
        assert r.ok, str(r)
        created.append(r.body[0])

    broadcasts = _signals_during(env.bus.address, spawn_and_stop)
    path = created[0]
    caller = env.callers(NOBODY)
    assert caller.backends() == []  # ListBackends hides it...
    # ... and so do GetManagedObjects, Properties.GetAll and Properties.Get:
    objects = caller.call(
        "GetManagedObjects",
        path="/org/vhostuserd/Broker1",
        interface="org.freedesktop.DBus.ObjectManager",
    ).body[0]
    seen = objects[path][BACKEND_IFACE]
    assert not PRIVATE & set(seen), f"uid {NOBODY} sees root's backend: {seen}"
    assert seen["State"] == "running" and seen["Descriptor"] == "50-fs.json"
    got = caller.call("GetAll", "s", [BACKEND_IFACE], path=path, interface=PROPS_IFACE)
    assert got.ok and not PRIVATE & set(got.body[0]), str(got)
    for name in PRIVATE:
        r = caller.call("Get", "ss", [BACKEND_IFACE, name], path=path, interface=PROPS_IFACE)
        assert "/root/private-project" not in str(r)
        r.expect_error("NotAuthorized")
    # ... and the broadcasts everyone receives (InterfacesAdded, PropertiesChanged) carry none.
    added = [m for m in broadcasts if m.member == "InterfacesAdded" and m.body[0] == path]
    assert added and not PRIVATE & set(added[0].body[1][BACKEND_IFACE]), added
    assert all(not PRIVATE & set(m.body[1]) for m in broadcasts if m.member == "PropertiesChanged")
    assert "/root/private-project" not in str([m.body for m in broadcasts])
    # The owner (root here) and a holder of manage see it whole.
    assert "/root/private-project" in str(admin.prop("Argv", path, BACKEND_IFACE))
    polkit.set_allowed(SPAWN, MANAGE)
    manager = env.callers(OTHER_UID)
    objects = manager.call(
        "GetManagedObjects",
        path="/org/vhostuserd/Broker1",
        interface="org.freedesktop.DBus.ObjectManager",
    ).body[0]
    assert "/root/private-project" in str(objects[path][BACKEND_IFACE]["Argv"])
    # A caller's own backend is whole for it.
    own = caller.spawn("50-gpu.json")
    assert own.ok, str(own)
    assert int(caller.prop("Pid", own.body[0], BACKEND_IFACE)) > 0
