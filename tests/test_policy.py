"""The policy rules (core.policy) as tables: quotas, who may manage whose backend, as whom a
backend runs, which device and socket a Spawn may pass on, what polkit is asked and what its
answer means, and the bounds of a Resolve. Pure functions of plain values: no bus, no daemon.
The bus tests prove the wiring (that the daemon asks these rules, and answers with the error).
"""

from __future__ import annotations

import dataclasses
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vhostuserd.core import policy
from vhostuserd.core.descriptors import Descriptor
from vhostuserd.core.errors import INTERACTIVE_REQUIRED, BrokerError, Err
from vhostuserd.core.options import SpawnPlan
from vhostuserd.core.policy import (
    MANAGE,
    SETPRIV,
    SPAWN,
    SPAWN_DEVICE,
    Account,
    Ask,
    Quota,
    SocketFacts,
)

CHR = stat.S_IFCHR | 0o660
REG = stat.S_IFREG | 0o644


def descriptor(btype: str = "gpu", name: str = "50-x.json") -> Descriptor:
    return Descriptor(
        name=name, path=f"/d/{name}", tier="data", type=btype, description="", binary="/usr/bin/x"
    )


# ---- quotas: the daemon's total first, then the caller's; what has exited does not count

QUOTA = Quota(per_uid=2, total=3)


@pytest.mark.parametrize(
    ("backends", "uid", "refusal"),
    [
        ([], 1000, None),
        ([(1000, False)], 1000, None),
        ([(1000, False), (1000, False)], 1000, "uid 1000 already runs 2 backends, its quota"),
        ([(1000, False), (1000, True)], 1000, None),  # an exited backend is not counted
        ([(1000, False), (1000, False)], 1001, None),  # another uid's count is its own
        (
            [(1000, False), (1001, False), (1002, False)],
            1003,
            "3 backends are running, the most this daemon runs",
        ),
        (  # both bounds reached: the daemon's total is what the caller hears
            [(1000, False), (1000, False), (1001, False)],
            1000,
            "3 backends are running, the most this daemon runs",
        ),
        ([(1000, True)] * 5, 1000, None),
    ],
)
def test_quota(backends: list[tuple[int, bool]], uid: int, refusal: str | None) -> None:
    assert policy.quota_error(QUOTA, uid, backends) == refusal


# ---- managing another user's backend: its owner uid and root outright, others ask polkit


@dataclass
class Backend:
    id: str = "7"
    descriptor: str = "50-x.json"
    binary: str = "/usr/bin/x"
    owner_uid: int = 1000


@pytest.mark.parametrize(
    ("uid", "verb", "asked"),
    [
        (1000, "stop it", None),  # the owner
        (0, "stop it", None),  # root
        (
            1001,
            "stop it",
            Ask(
                MANAGE,
                {
                    "descriptor": "50-x.json",
                    "binary": "/usr/bin/x",
                    "backend": "7",
                    "owner-uid": "1000",
                },
                f"{MANAGE}: backend 7 belongs to uid 1000; uid 1001 may not stop it",
            ),
        ),
    ],
)
def test_manage(uid: int, verb: str, asked: Ask | None) -> None:
    assert policy.ask_to_manage(uid, Backend(), verb) == asked


def test_a_refused_log_read_says_what_was_refused() -> None:
    ask = policy.ask_to_manage(1001, Backend(), "read its log")
    assert ask is not None and ask.refusal.endswith("uid 1001 may not read its log")


@pytest.mark.parametrize(
    ("uid", "owners", "asks"),
    [
        (0, [1000, 1001], False),  # root sees all
        (1000, [], False),  # nothing to see
        (1000, [1000, 1000], False),  # only its own: nothing to ask
        (1000, [1000, 1001], True),  # another user's is there: ask polkit
        (1001, [1000], True),
    ],
)
def test_seeing_every_backend(uid: int, owners: list[int], asks: bool) -> None:
    ask = policy.ask_to_see_all(uid, owners)
    assert ask == (Ask(MANAGE, {"list": "all"}) if asks else None)


def test_reload_asks_for_manage() -> None:
    assert policy.ask_to_reload() == Ask(MANAGE, {"request": "reload"})


# ---- who is asked, and what polkit's answer means


@pytest.mark.parametrize(
    ("system", "uid", "consults"),
    [(True, 1000, True), (True, 0, False), (False, 1000, False), (False, 0, False)],
)
def test_polkit_decides_for_the_system_services_callers_but_root(
    system: bool, uid: int, consults: bool
) -> None:
    assert policy.consults_polkit(system=system, uid=uid) is consults


@pytest.mark.parametrize(
    ("uid", "refusal"),
    [
        (1000, None),
        (
            1001,
            f"{SPAWN}: this session service acts for uid 1000 only, not uid 1001",
        ),
        (0, f"{SPAWN}: this session service acts for uid 1000 only, not uid 0"),  # root too
    ],
)
def test_a_session_service_acts_for_its_own_uid_only(uid: int, refusal: str | None) -> None:
    assert policy.session_refusal(SPAWN, uid=uid, daemon_uid=1000) == refusal


@pytest.mark.parametrize(
    ("authorized", "challenge", "interactive", "name", "message"),
    [
        (True, False, False, None, None),
        (True, True, False, None, None),
        (False, False, False, Err.NOT_AUTHORIZED.dbus_name, "not authorized for uid 1000"),
        (False, False, True, Err.NOT_AUTHORIZED.dbus_name, "not authorized for uid 1000"),
        (
            False,
            True,
            False,
            INTERACTIVE_REQUIRED,
            "authentication is required; call again with interactive authorization allowed",
        ),
        (
            False,
            True,
            True,
            INTERACTIVE_REQUIRED,
            "and no polkit authentication agent was there to ask for it",
        ),
    ],
)
def test_polkit_verdict(
    authorized: bool, challenge: bool, interactive: bool, name: str | None, message: str | None
) -> None:
    e = policy.polkit_verdict(
        SPAWN, uid=1000, authorized=authorized, challenge=challenge, interactive=interactive
    )
    if name is None:
        assert e is None
        return
    assert e is not None and e.name is Err.NOT_AUTHORIZED  # a challenge is a refusal too
    assert e.dbus_name == name
    assert message is not None and str(e).startswith(f"{SPAWN}: ") and message in str(e)


# ---- what polkit is asked for a Spawn


def spawn_plan(values: dict[str, Any], extra_args: tuple[str, ...] = ()) -> SpawnPlan:
    return SpawnPlan(
        argv=("/usr/bin/x",),
        detach=False,
        settle_ms=250,
        socket_kind=None,
        values=values,
        extra_args=extra_args,
    )


BASE = {"descriptor": "50-x.json", "type": "gpu", "binary": "/usr/bin/x"}


@pytest.mark.parametrize(
    ("values", "extra_args", "idmap", "app", "details", "actions"),
    [
        ({}, (), None, None, BASE, [SPAWN]),
        ({"detach": True, "settle-ms": 10, "virgl": True}, (), None, None, BASE, [SPAWN]),
        (
            {"render-node": "/dev/dri/renderD128"},
            (),
            None,
            None,
            {**BASE, "render-node": "/dev/dri/renderD128"},
            [SPAWN, SPAWN_DEVICE],  # a device passed on asks spawn-device too
        ),
        (
            {"evdev-path": "/dev/input/event3"},
            (),
            None,
            None,
            {**BASE, "evdev-path": "/dev/input/event3"},
            [SPAWN, SPAWN_DEVICE],
        ),
        (
            {"shared-dir": "/srv/share", "blk-file": "/var/disk.img"},
            (),
            None,
            None,
            {**BASE, "shared-dir": "/srv/share", "blk-file": "/var/disk.img"},
            [SPAWN],
        ),
        ({}, (), "caller", None, {**BASE, "idmap": "caller"}, [SPAWN]),  # in effect, asked or not
        (
            {"log-level": "debug", "sandbox": False, "threads": 4},  # admin-vetted extras
            ("--log-level=debug", "--x=a b"),
            None,
            None,
            {
                **BASE,
                "log-level": "debug",
                "sandbox": "false",
                "threads": "4",
                "extra-args": "--log-level=debug '--x=a b'",
            },
            [SPAWN],
        ),
        ({}, (), None, "org.example.App", {**BASE, "flatpak-app-id": "org.example.App"}, [SPAWN]),
        ({}, (), None, "", BASE, [SPAWN]),  # not a Flatpak app
    ],
)
def test_spawn_details(
    values: dict[str, Any],
    extra_args: tuple[str, ...],
    idmap: str | None,
    app: str | None,
    details: dict[str, str],
    actions: list[str],
) -> None:
    asks = policy.ask_to_spawn(
        descriptor(), spawn_plan(values, extra_args), idmap_mode=idmap, app_id=app
    )
    assert [a.action for a in asks] == actions
    assert all(a.details == details for a in asks)


# ---- as whom a backend runs

DAEMON = (0, 0)  # the system service runs as root


@pytest.mark.parametrize(
    ("uid", "devices", "system", "daemon", "account", "ids", "prefix"),
    [
        # session service: as itself, no setpriv at all
        (1000, (), False, (1000, 1000), Account(1000, (1000,)), (1000, 1000, ()), ()),
        (1000, (44,), False, (1000, 1000), None, (1000, 1000, ()), ()),  # no device group
        # system service: as the caller, its groups and the device's, with no_new_privs
        (
            1000,
            (),
            True,
            DAEMON,
            Account(100, (100, 27)),
            (1000, 100, (100, 27)),
            (
                SETPRIV,
                "--reuid=1000",
                "--regid=100",
                "--groups=100,27",
                "--no-new-privs",
                "--",
            ),
        ),
        (
            1000,
            (44, 27),
            True,
            DAEMON,
            Account(100, (100, 27)),
            (1000, 100, (100, 27, 44)),  # a group once, in order
            (
                SETPRIV,
                "--reuid=1000",
                "--regid=100",
                "--groups=100,27,44",
                "--no-new-privs",
                "--",
            ),
        ),
        (  # no passwd entry (a container's uid): its own group only
            123456,
            (),
            True,
            DAEMON,
            None,
            (123456, 123456, (123456,)),
            (
                SETPRIV,
                "--reuid=123456",
                "--regid=123456",
                "--groups=123456",
                "--no-new-privs",
                "--",
            ),
        ),
        # root's backends stay root's, but get no_new_privs too
        (0, (), True, DAEMON, Account(0, (0,)), (0, 0, (0,)), (SETPRIV, "--no-new-privs", "--")),
    ],
)
def test_run_as(
    uid: int,
    devices: tuple[int, ...],
    system: bool,
    daemon: tuple[int, int],
    account: Account | None,
    ids: tuple[int, int, tuple[int, ...]],
    prefix: tuple[str, ...],
) -> None:
    r = policy.run_as(uid, devices, system=system, daemon=daemon, account=account)
    assert (r.uid, r.gid, r.groups) == ids
    assert r.no_new_privs is system
    assert r.exec_prefix() == prefix


# ---- devices: in the option's directory, and a character device


@pytest.mark.parametrize(
    ("option", "value", "real", "node", "refusal"),
    [
        ("render-node", "/dev/dri/renderD128", "/dev/dri/renderD128", CHR, None),
        ("render-node", "/run/link", "/dev/dri/renderD128", CHR, None),  # where it resolves to
        ("evdev-path", "/dev/input/event3", "/dev/input/event3", CHR, None),
        (
            "render-node",
            "/dev/dri/../null",
            "/dev/null",
            CHR,
            "option 'render-node': /dev/dri/../null is not under /dev/dri/",
        ),
        (
            "render-node",
            "/dev/input/event3",  # the other option's directory
            "/dev/input/event3",
            CHR,
            "option 'render-node': /dev/input/event3 is not under /dev/dri/",
        ),
        (
            "evdev-path",
            "/dev/input/link",
            "/etc/shadow",
            "Permission denied",  # the path rule comes first: nothing said of the file
            "option 'evdev-path': /dev/input/link is not under /dev/input/",
        ),
        (
            "evdev-path",
            "/dev/input/event99",
            "/dev/input/event99",
            "No such file or directory",
            "option 'evdev-path': /dev/input/event99: No such file or directory",
        ),
        (
            "render-node",
            "/dev/dri/file",
            "/dev/dri/file",
            REG,
            "option 'render-node': /dev/dri/file is not a character device",
        ),
        (
            "evdev-path",
            "/dev/input/by-id",
            "/dev/input/by-id",
            stat.S_IFDIR | 0o755,
            "option 'evdev-path': /dev/input/by-id is not a character device",
        ),
        (
            "render-node",
            "/dev/dri/sda",
            "/dev/dri/sda",
            stat.S_IFBLK | 0o660,
            "option 'render-node': /dev/dri/sda is not a character device",
        ),
    ],
)
def test_device(option: str, value: str, real: str, node: int | str, refusal: str | None) -> None:
    assert policy.device_error(option, value, real, node) == refusal


# ---- the socket a Spawn carries

NEEDED = "an AF_UNIX SOCK_STREAM socket is needed"


@pytest.mark.parametrize(
    ("facts", "refusal"),
    [
        (SocketFacts(connected=True), None),
        (SocketFacts(listening=True), None),
        (
            SocketFacts(unusable="Bad file descriptor"),
            "the socket argument is not a usable fd: Bad file descriptor",
        ),
        (
            SocketFacts(o_path=True),
            "the socket argument is an O_PATH fd; pass the socket itself",
        ),
        (SocketFacts(file_type="fifo"), f"the socket argument is a pipe; {NEEDED}"),
        (SocketFacts(file_type="other"), f"the socket argument is not a socket; {NEEDED}"),
        (
            SocketFacts(uninspectable="Too many open files"),
            "the socket argument cannot be inspected: Too many open files",
        ),
        (
            SocketFacts(unix=False, family=10, connected=True),
            "the socket argument is of family 10; AF_UNIX is needed",
        ),
        (
            SocketFacts(stype="SOCK_DGRAM", connected=True),
            "the socket argument is SOCK_DGRAM; vhost-user needs SOCK_STREAM",
        ),
        (
            SocketFacts(stype="SOCK_SEQPACKET", listening=True),
            "the socket argument is SOCK_SEQPACKET; vhost-user needs SOCK_STREAM",
        ),
        (
            SocketFacts(),
            "the socket argument is neither connected nor listening; pass one end of a "
            "socketpair or a bound, listening socket, as the backend needs",
        ),
    ],
)
def test_socket(facts: SocketFacts, refusal: str | None) -> None:
    assert policy.socket_error(facts) == refusal


CONNECTED_NEEDED = (
    "50-x.json is a {} backend: it serves the socket it is given, so it needs a connected "
    "socket (one end of a socketpair), not a listening one"
)
LISTENING_NEEDED = (
    "50-x.json is a {} backend: it accepts its front-end on the socket, so it needs a "
    "listening socket (bind + listen), not a connected one"
)


@pytest.mark.parametrize(
    ("btype", "kind", "listening", "refusal"),
    [
        ("gpu", "connected", False, None),
        ("gpu", "connected", True, CONNECTED_NEEDED.format("gpu")),
        ("input", "connected", True, CONNECTED_NEEDED.format("input")),
        ("fs", "listening", True, None),
        ("fs", "listening", False, LISTENING_NEEDED.format("fs")),
        ("block", "listening", False, LISTENING_NEEDED.format("block")),
        ("sound", None, True, None),  # a kind not known: either is passed on
        ("sound", None, False, None),
    ],
)
def test_socket_kind(btype: str, kind: str | None, listening: bool, refusal: str | None) -> None:
    assert policy.socket_kind_error(descriptor(btype), kind, listening) == refusal


# ---- Resolve's bounds


@pytest.mark.parametrize(
    ("features", "refusal"),
    [
        ([], None),
        (["virgl"] * policy.MAX_FEATURES, None),
        (
            ["virgl"] * (policy.MAX_FEATURES + 1),
            f"{policy.MAX_FEATURES + 1} features requested; at most 64 may be",
        ),
        (["x" * policy.MAX_FEATURE_BYTES], None),
        (
            ["virgl", "x" * (policy.MAX_FEATURE_BYTES + 1)],
            "feature #1 is 129 characters long; at most 128 bytes each",
        ),
        (  # bytes are counted: 43 three-byte characters are 129 bytes
            ["\u20ac" * 43],
            "feature #0 is 43 characters long; at most 128 bytes each",
        ),
    ],
)
def test_resolve_limits(features: list[str], refusal: str | None) -> None:
    assert policy.features_error(features) == refusal
    if refusal is not None:
        assert "x" * 20 not in refusal  # says how much, never what


# ---- the facts the edge reads of real fds, decided on by the rule above


def _fds(kind: str, tmp: Path) -> tuple[int, list[Any]]:
    """An fd of ``kind`` (files in ``tmp``), and what to close after."""
    import os
    import socket

    if kind == "socketpair":
        a, b = socket.socketpair()
        return a.fileno(), [a, b]
    if kind in ("listening", "unbound"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if kind == "listening":
            s.bind("")  # an abstract address the kernel picks
            s.listen()
        return s.fileno(), [s]
    if kind == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        return s.fileno(), [s]
    if kind == "tcp-listening":
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        s.listen()
        return s.fileno(), [s]
    if kind in ("dgram", "seqpacket"):
        stype = socket.SOCK_DGRAM if kind == "dgram" else socket.SOCK_SEQPACKET
        a, b = socket.socketpair(socket.AF_UNIX, stype)
        return a.fileno(), [a, b]
    if kind in ("pipe", "pipe-write-end"):
        r, w = os.pipe()
        return (r if kind == "pipe" else w), [_Closing(r), _Closing(w)]
    if kind == "o_path":
        fd = os.open("/", os.O_PATH)
        return fd, [_Closing(fd)]
    if kind == "o_path-of-a-socket":  # even of a listening one: it cannot be used as one
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(tmp / "s.sock"))
        s.listen()
        fd = os.open(tmp / "s.sock", os.O_PATH)
        return fd, [_Closing(fd), s]
    if kind == "regular-file":
        (tmp / "f").write_text("not a socket")
        fd = os.open(tmp / "f", os.O_RDONLY)
        return fd, [_Closing(fd)]
    r, w = os.pipe()  # "closed": a number that was an fd a moment ago
    os.close(r)
    os.close(w)
    return r, []


@dataclass
class _Closing:
    fd: int

    def close(self) -> None:
        import os

        os.close(self.fd)


@pytest.mark.parametrize(
    ("kind", "refusal"),
    [
        ("socketpair", None),
        ("listening", None),
        ("unbound", "neither connected nor listening"),
        ("udp", "of family 2; AF_UNIX is needed"),
        ("tcp-listening", "of family 2; AF_UNIX is needed"),
        ("dgram", "is SOCK_DGRAM; vhost-user needs SOCK_STREAM"),
        ("seqpacket", "is SOCK_SEQPACKET; vhost-user needs SOCK_STREAM"),
        ("pipe", "is a pipe;"),
        ("pipe-write-end", "is a pipe;"),
        ("regular-file", "is not a socket;"),
        ("o_path", "is an O_PATH fd"),
        ("o_path-of-a-socket", "is an O_PATH fd"),
        ("closed", "is not a usable fd: Bad file descriptor"),
    ],
)
def test_the_facts_of_a_real_fd(kind: str, refusal: str | None, tmp_path: Path) -> None:
    from vhostuserd.edges.sockets import socket_facts

    fd, keep = _fds(kind, tmp_path)
    try:
        why = policy.socket_error(socket_facts(fd))
    finally:
        for k in keep:
            k.close()
    assert (why is None) if refusal is None else (why is not None and refusal in why), why


# ---- the facts the edge reads of real device paths, decided on by the device rule above


@pytest.mark.parametrize(
    ("option", "value", "refusal"),
    [
        ("render-node", "/dev/null", "option 'render-node': /dev/null is not under /dev/dri/"),
        ("render-node", "/dev/dri/../null", "is not under /dev/dri/"),
        ("render-node", "/dev/dri/../../tmp", "is not under /dev/dri/"),
        ("render-node", "/dev/dri/renderD99999", "renderD99999: No such file or directory"),
        ("evdev-path", "/dev/input/event9999", "event9999: No such file or directory"),
        ("evdev-path", "/dev/input/../null", "is not under /dev/input/"),
        ("evdev-path", "/dev/zero", "is not under /dev/input/"),
        ("evdev-path", "/dev/input/../../etc/passwd", "is not under /dev/input/"),
        ("evdev-path", "/etc/passwd", "is not under /dev/input/"),
    ],
)
def test_the_facts_of_a_real_path(option: str, value: str, refusal: str) -> None:
    from vhostuserd.edges.trust import check_device

    with pytest.raises(BrokerError) as e:
        check_device(option, value)
    assert e.value.name is Err.INVALID_OPTION and refusal in str(e.value), e.value


def test_a_device_path_is_judged_where_it_resolves_and_given_as_that(tmp_path: Path) -> None:
    import glob
    import os

    from vhostuserd.edges.trust import check_device

    link = tmp_path / "event0"  # a symlink the caller controls
    link.symlink_to("/dev/null")
    with pytest.raises(BrokerError, match="is not under /dev/input/"):
        check_device("evdev-path", str(link))
    devices = [
        (option, path)
        for option, pattern in (("render-node", "/dev/dri/*"), ("evdev-path", "/dev/input/*"))
        for path in sorted(glob.glob(pattern))
        if stat.S_ISCHR(os.stat(path).st_mode)
    ]
    if not devices:
        pytest.skip("no character device under /dev/dri/ or /dev/input/ on this machine")
    option, path = devices[0]
    assert check_device(option, path) == (os.path.realpath(path), os.stat(path).st_gid)


# ---- trusted binaries: each step on the way must be root's and not writable by others

DIR = stat.S_IFDIR | 0o755
STICKY = stat.S_IFDIR | stat.S_ISVTX | 0o777


@pytest.mark.parametrize(
    ("uid", "mode", "last", "refusal"),
    [
        (0, DIR, False, None),
        (0, REG | 0o755, True, None),
        (1000, DIR, False, "/s (on the way to /s/x) is owned by uid 1000, not root"),
        (0, DIR | 0o020, False, "/s (on the way to /s/x) is group- or world-writable"),
        (0, REG | 0o757, True, "is group- or world-writable"),
        (0, STICKY, False, None),  # /tmp on the way is fine: nobody else can swap our entry
        (0, STICKY, True, "is group- or world-writable"),
    ],
)
def test_untrusted_step(uid: int, mode: int, last: bool, refusal: str | None) -> None:
    why = policy.untrusted_step("/s", "/s/x", uid=uid, mode=mode, last=last)
    assert why == refusal if refusal is None else refusal in (why or "")


def test_untrusted_binaries_are_diagnosed_and_refused_by_name() -> None:
    ok, bad = descriptor(name="50-ok.json"), descriptor(name="60-bad.json")
    bad = dataclasses.replace(bad, binary="/home/u/x")
    diags = policy.untrusted_diagnostics(
        [ok, bad], lambda binary: "owned by uid 1000" if binary == "/home/u/x" else None
    )
    assert [(d.path, d.level) for d in diags] == [("/d/60-bad.json", "error")]
    assert diags[0].message == "/binary: not run by the system service: owned by uid 1000"
    e = policy.untrusted_refusal("60-bad.json", "owned by uid 1000")
    assert e.name is Err.NOT_AUTHORIZED
    said = "60-bad.json: its binary cannot be trusted by the system service: owned by uid 1000"
    assert str(e) == said


@pytest.mark.parametrize(
    ("times", "now", "window", "left"),
    [
        ([], 100.0, 60, []),
        ([10.0, 50.0, 90.0], 100.0, 60, [50.0, 90.0]),  # 10 s is 90 s ago: no longer counts
        ([40.0], 100.0, 60, [40.0]),  # exactly the window ago still counts
        ([1.0, 2.0], 100.0, 60, []),
    ],
)
def test_restarts_older_than_the_window_no_longer_count(
    times: list[float], now: float, window: int, left: list[float]
) -> None:
    assert policy.recent_restarts(times, now, window) == left
