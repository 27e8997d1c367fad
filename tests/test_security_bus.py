"""The system service against callers who attack it through the bus itself (issue 9, items 1,
5, 6 and 8): a peer that never reads its replies, a flood of pending polkit checks, a departed
caller whose record is pushed out by thousands of other connections, calls to backends that
do not exist, and the loss of the bus connection.

Each test runs the real vhostuserd with --system on a private system bus, python-dbusmock's
polkitd template as the authority, and misbehaving peers as real processes of uid 65534
(tests/agents/rawbus.py, standard library only, run by Debian's python3).
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from busutil import BUS_NAME, MANAGER_PATH, PrivateBus, Tree, wait_for
from dbus_fast import Message
from helpers_auth import (
    BACKEND_IFACE,
    DEBIAN_PYTHON,
    MANAGE,
    NOBODY,
    OTHER_UID,
    PROPS_IFACE,
    SPAWN,
    Caller,
    DbusmockPolkit,
    Reply,
    Start,
    agent,
    as_nobody,
    descriptor_doc,
    public_dir,
    starts,
    system_bus,
    system_daemon,
)

MANAGER_IFACE = "org.vhostuserd.Broker1.Manager"


@pytest.fixture
def start(sysbus: PrivateBus, polkit: DbusmockPolkit, tmp_path: Path) -> Iterator[Start]:
    yield from starts(sysbus, polkit, tmp_path)


def _socket_path(bus: PrivateBus) -> str:
    return str(bus.socket)


@pytest.fixture
def public(tmp_path: Path) -> Iterator[Path]:
    """A directory uid 65534 can read: rawbus.py and its message files go there."""
    d = public_dir("vhostuserd-rawbus-")
    agent("rawbus.py", d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _raw_peer(d: Path, *args: str) -> subprocess.Popen[str]:
    """rawbus.py as uid 65534."""
    return subprocess.Popen(
        as_nobody(DEBIAN_PYTHON, str(d / "rawbus.py"), *args),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(d),
    )


def _messages(path: Path, msgs: list[Message]) -> Path:
    with open(path, "wb") as f:
        for m in msgs:
            data = bytes(m._marshall(False))
            f.write(struct.pack("<I", len(data)) + data)
    path.chmod(0o644)
    return path


def _oversized_resolves(n: int, features: int, size: int) -> list[Message]:
    feats = [f"f{i:05d}" + "x" * (size - 6) for i in range(features)]
    return [
        Message(
            destination=BUS_NAME,
            path=MANAGER_PATH,
            interface=MANAGER_IFACE,
            member="Resolve",
            signature="sas",
            body=["gpu", feats],
            serial=i + 2,
        )
        for i in range(n)
    ]


def _answered_within(
    caller: object,
    seconds: float,
    member: str = "ListDescriptors",
    signature: str = "s",
    body: tuple[object, ...] = ("",),
) -> float:
    t0 = time.monotonic()
    r = caller.call(member, signature, list(body), timeout=seconds)  # type: ignore[attr-defined]
    took = time.monotonic() - t0
    assert r.ok, str(r)
    return took


# ---------------------------------------------------------------- item 1: replies and the bus


def test_every_error_the_daemon_sends_is_bounded_in_size(start: Start) -> None:
    s = start()
    c = s.callers(NOBODY)
    huge = "n" * 1_000_000
    for member, signature, body in (
        ("GetCapabilities", "s", [huge]),
        ("Resolve", "sas", [huge, []]),
        ("Resolve", "sas", [huge, ["virgl"]]),
        ("ListDescriptors", "s", [huge]),
    ):
        r = c.call(member, signature, body)
        assert len(r.message) <= 8192, (member, len(r.message))


def test_a_peer_that_never_reads_150_oversized_errors_does_not_take_the_daemon_off_the_bus(
    start: Start, public: Path
) -> None:
    s = start()
    admin = s.admin()
    # 150 calls of about 1.1 MB each; today's main answered each with a 2 MB error.
    msgs = _messages(public / "flood.bin", _oversized_resolves(150, 10_000, 110))
    flooder = _raw_peer(public, "flood", _socket_path(s.bus), str(msgs))
    try:
        assert flooder.stdout is not None
        line = flooder.stdout.readline()
        assert line.startswith("sent 150"), (
            f"{line} {flooder.stderr.read() if flooder.stderr else ''}"
        )
        # The bus delivers the admin's call after the flood that was sent before it: when it
        # is answered, the daemon has read and answered all 150.
        _answered_within(admin, 120.0)
        other = s.callers(OTHER_UID)
        _answered_within(other, 1.0, "Resolve", "sas", ("gpu", []))
        assert s.daemon.proc.poll() is None
        assert s.bus.name_has_owner(), s.daemon.log()
        assert "lost its connection" not in s.daemon.log()
    finally:
        flooder.kill()
        flooder.wait()
    # Once the peer is gone, everything is as before.
    _answered_within(admin, 5.0)
    s.daemon.assert_clean_log()


def _chatty(tree: Tree, bindir: Path) -> None:
    """A gpu backend that writes 64 KiB of output and then idles: each GetLog is that big."""
    path = bindir / "chatty"
    path.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = --print-capabilities ]; then\n'
        '  echo \'{"type":"gpu","features":[]}\'; exit 0\n'
        "fi\n"
        "head -c 65536 /dev/zero | tr '\\0' x; echo\n"
        "while :; do sleep 1; done\n"
    )
    path.chmod(0o755)
    tree.write("data", "60-chatty.json", descriptor_doc("gpu", str(path)))


def test_a_peer_that_never_reads_2000_full_size_logs_does_not_take_the_daemon_off_the_bus(
    start: Start, public: Path
) -> None:
    # Each reply is legitimately 64 KiB: bounding replies does not help here, only writing
    # to a full socket patiently does (dbus-fast 5.2 disconnects on EAGAIN).
    s = start(prepare=_chatty)
    owner = s.callers(NOBODY)
    r = owner.spawn("60-chatty.json", {"settle-ms": ("u", 0)})
    assert r.ok, str(r)
    path = r.body[0]
    wait_for(
        lambda: len(owner.call("GetLog", path=path, interface=BACKEND_IFACE).body[0]) >= 65536,
        "the backend's 64 KiB of output",
    )
    msgs = [
        Message(
            destination=BUS_NAME, path=path, interface=BACKEND_IFACE, member="GetLog", serial=i + 2
        )
        for i in range(2000)
    ]
    flooder = _raw_peer(
        public, "flood", _socket_path(s.bus), str(_messages(public / "getlog.bin", msgs))
    )
    try:
        assert flooder.stdout is not None
        line = flooder.stdout.readline()
        assert line.startswith("sent 2000"), (
            f"{line} {flooder.stderr.read() if flooder.stderr else ''}"
        )
        admin = s.admin()
        _answered_within(admin, 120.0)
        _answered_within(s.callers(OTHER_UID), 1.0)
        assert s.bus.name_has_owner(), s.daemon.log()
        assert s.daemon.proc.poll() is None
    finally:
        flooder.kill()
        flooder.wait()
    r = owner.call("GetLog", path=path, interface=BACKEND_IFACE)
    assert r.ok and len(r.body[0]) >= 65536, str(r)[:200]


def test_a_daemon_whose_bus_connection_is_lost_says_so_and_exits_non_zero(tmp_path: Path) -> None:
    bus = system_bus()
    tree = Tree.make(tmp_path)
    daemon = system_daemon(bus, tree)
    try:
        bus.proc.kill()  # the bus goes away under the daemon
        bus.proc.wait()
        wait_for(lambda: daemon.proc.poll() is not None, "the daemon to exit after losing the bus")
        assert daemon.proc.returncode not in (0, None), daemon.log()
        assert "lost its connection to the bus" in daemon.log(), daemon.log()
    finally:
        daemon.stop()
        bus.close()


# ---------------------------------------------------------------- item 5: pending polkit checks


def _replies_so_far(
    caller: Caller, sent: list[int], want: int, timeout: float = 20.0
) -> list[Reply]:
    """The first ``want`` replies to the calls ``sent``, in whatever order they come (which
    calls get a polkit slot depends on the order their tasks run); removes them from ``sent``."""
    got: list[Reply] = []
    deadline = time.monotonic() + timeout
    while len(got) < want:
        assert time.monotonic() < deadline, f"only {len(got)} of {want} replies in {timeout}s"
        for n in list(sent):
            try:
                got.append(caller.result(n, timeout=0.01))
            except AssertionError:
                continue
            sent.remove(n)
            if len(got) == want:
                break
    return got


def test_a_caller_flooding_polkit_checks_is_bounded_and_others_are_still_authorized(
    start: Start, polkit: DbusmockPolkit
) -> None:
    s = start()
    polkit.set_allowed(SPAWN)  # not manage: the flooder's Reloads are all denied
    polkit.simulate_hang(True)
    flooder = s.callers(NOBODY)
    sent = [flooder.send("Reload", interactive=True) for _ in range(130)]
    # Over its bound, the flooder is told at once, without polkit being asked (the last of the
    # 130 may instead be refused by the bus itself: 128 pending calls per connection).
    over = _replies_so_far(flooder, sent, want=len(sent) - 8)
    ours = "org.vhostuserd.Broker1.Error.LimitsExceeded"
    assert all(r.error in (ours, "org.freedesktop.DBus.Error.LimitsExceeded") for r in over), [
        str(r) for r in over if r.error != ours
    ]
    assert sum(r.error == ours for r in over) >= 100
    assert "uid 65534 already has 8 authorization checks" in next(
        r.message for r in over if r.error == ours
    )
    wait_for(polkit.hanging, "the flooder's checks to reach polkit")
    victim = s.callers(OTHER_UID)
    n = victim.send_spawn("50-gpu.json", {"settle-ms": ("u", 0)})
    wait_for(
        lambda: sum(1 for a in polkit.actions() if a == SPAWN) == 1,
        "the victim's check to reach polkit",
    )
    polkit.release()
    polkit.simulate_hang(False)
    r = victim.result(n)
    assert r.ok, str(r)
    answered = [flooder.result(x) for x in sent]
    assert all(
        a.error
        in (f"org.vhostuserd.Broker1.Error.{e}" for e in ("NotAuthorized", "LimitsExceeded"))
        for a in answered
    ), [str(a) for a in answered]
    assert sum(1 for a in polkit.actions() if a == MANAGE) <= 16
    assert s.daemon.proc.poll() is None


# ---------------------------------------------------------------- item 6: departed callers


def test_a_caller_who_left_during_polkit_gets_nothing_even_after_8400_others_came_and_went(
    start: Start, polkit: DbusmockPolkit, public: Path
) -> None:
    s = start()
    polkit.set_allowed(SPAWN)
    polkit.simulate_hang(True)
    leaver = s.callers(NOBODY)
    leaver.send_spawn("50-gpu.json", {"settle-ms": ("u", 0)})
    wait_for(polkit.hanging, "the Spawn to reach polkit")
    leaver.kill()
    wait_for(lambda: not s.bus.name_has_owner(leaver.name), "the caller to leave the bus")
    churn = _raw_peer(public, "churn", _socket_path(s.bus), "8400")
    out, err = churn.communicate(timeout=120)
    assert out.strip() == "done", err
    polkit.release()
    polkit.simulate_hang(False)
    wait_for(
        lambda: f"{leaver.name} (uid {NOBODY}) may {SPAWN}" in s.daemon.log(), "polkit's answer"
    )
    admin = s.admin()
    assert admin.backends() == []
    wait_for(
        lambda: "left the bus; nothing was started" in s.daemon.log(), "the refusal in the log"
    )
    assert s.running() == []


# ------------------------------------------------------------ item 8: backends that do not exist


@pytest.mark.parametrize(
    ("member", "interface", "signature", "body"),
    [
        ("Stop", BACKEND_IFACE, "", []),
        ("GetLog", BACKEND_IFACE, "", []),
        ("Get", PROPS_IFACE, "ss", [BACKEND_IFACE, "State"]),
        ("GetAll", PROPS_IFACE, "s", [BACKEND_IFACE]),
    ],
)
def test_a_call_to_a_backend_that_does_not_exist_is_not_found(
    start: Start, member: str, interface: str, signature: str, body: list[object]
) -> None:
    s = start()
    c = s.callers(NOBODY)
    r = c.call(member, signature, body, path=f"{MANAGER_PATH}/backend/999", interface=interface)
    msg = r.expect_error("NotFound")
    assert msg == "no backend 999", msg


def test_the_client_raises_limits_exceeded_for_an_oversized_resolve(start: Start) -> None:
    import asyncio

    from vhostuserd.client import BrokerClient, LimitsExceeded

    s = start()

    async def main() -> None:
        async with await BrokerClient.connect("address", s.bus.address) as c:
            try:
                await c.resolve("gpu", [f"f{i}" for i in range(65)])
            except LimitsExceeded as e:
                assert "65 features" in str(e) and e.name.endswith(".LimitsExceeded")
            else:
                raise AssertionError("an oversized Resolve was not refused")

    asyncio.run(main())
