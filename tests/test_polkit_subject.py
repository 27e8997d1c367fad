"""What exactly the system service asks polkit, seen by a polkit authority of our own.

python-dbusmock's polkitd template ignores the subject and the flags and never answers with
a challenge, so this module runs a small dbus-fast service that owns
org.freedesktop.PolicyKit1 on the private system bus, answers CheckAuthorization from a
table the test sets, and records every call: the subject must be the caller's unique bus
name (never a pid, which can be recycled), and the details must be the ones rules match on.
How the flags follow the caller's ALLOW_INTERACTIVE_AUTHORIZATION and what each answer
becomes (a challenge, a no, an error) is Authority.check's rule, in tests/test_polkit_answers.py;
tests/test_cli_interactive.py shows both against the real polkitd.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from busutil import PrivateBus, Tree
from helpers_auth import (
    BACKEND_IFACE,
    MANAGE,
    NOBODY,
    OTHER_UID,
    SPAWN,
    Caller,
    RecordingPolkit,
    SystemSetup,
    public_dir,
    setup,
)

from vhostuserd.core.errors import BrokerError
from vhostuserd.edges import authority


@pytest.fixture(scope="module")
def polkit(
    sysbus: PrivateBus, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RecordingPolkit]:
    p = RecordingPolkit(sysbus, tmp_path_factory.mktemp("polkit"))
    yield p
    p.close()


@pytest.fixture
def sys_env(sysbus: PrivateBus, polkit: RecordingPolkit, tmp_path: Path) -> Iterator[SystemSetup]:
    polkit.answer({})
    polkit.clear()
    yield from setup(sysbus, Tree.make(tmp_path))


def daemon_name(env: SystemSetup) -> str:
    r = env.bus.busctl(
        "call",
        "org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus",
        "GetNameOwner",
        "s",
        "org.vhostuserd.Broker1",
    )
    return r.stdout.split('"')[1]


def subject_of(caller: Caller) -> list[Any]:
    return ["system-bus-name", {"name": {"sig": "s", "value": caller.name}}]


def test_spawn_check_names_the_caller_by_its_unique_name_with_the_rule_details(
    sys_env: SystemSetup, polkit: RecordingPolkit
) -> None:
    polkit.answer({SPAWN: [True, False]})
    caller = sys_env.callers(NOBODY)
    gpu = caller.spawn("50-gpu.json", {"virgl": ("b", True)})
    assert gpu.ok, str(gpu)
    fs = caller.spawn(
        "50-fs-o.json", {"shared-dir": ("s", "/srv/share"), "detach": ("b", False)}, fd="listen"
    )
    assert fs.ok, str(fs)
    calls = polkit.calls()
    assert len(calls) == 2, calls
    binary = {d["name"]: d["binary"] for d in caller.descriptors()}
    for call in calls:
        assert call["subject"] == subject_of(caller)
        assert call["action"] == SPAWN
        assert call["flags"] == 0
        assert call["cancellation_id"] == ""
        assert call["sender"] == daemon_name(sys_env)
        assert call["path"] == "/org/freedesktop/PolicyKit1/Authority"
    assert calls[0]["details"] == {
        "descriptor": "50-gpu.json",
        "type": "gpu",
        "binary": binary["50-gpu.json"],
    }
    # flatpak-app-id is absent for a process that is not in a Flatpak sandbox.
    assert calls[1]["details"] == {
        "descriptor": "50-fs-o.json",
        "type": "fs",
        "binary": binary["50-fs-o.json"],
        "shared-dir": "/srv/share",
        "idmap": "caller",  # fs backends: the user namespace's mode in effect (userns)
    }


def test_manage_check_for_stop_names_the_backend_and_its_owner(
    sys_env: SystemSetup, polkit: RecordingPolkit
) -> None:
    polkit.answer({SPAWN: [True, False]})
    owner, other = sys_env.callers(OTHER_UID), sys_env.callers(NOBODY)
    path = owner.spawn("50-gpu.json").body[0]
    backend_id = path.rsplit("/", 1)[1]
    polkit.clear()
    assert MANAGE in other.stop_backend(path).expect_error("NotAuthorized")
    [call] = polkit.calls()
    assert call["action"] == MANAGE and call["subject"] == subject_of(other)
    assert call["details"]["backend"] == backend_id
    assert call["details"]["owner-uid"] == str(OTHER_UID)
    assert call["details"]["descriptor"] == "50-gpu.json"
    # The owner itself is never checked for its own backend.
    polkit.clear()
    assert owner.call("GetLog", path=path, interface=BACKEND_IFACE).ok
    assert owner.stop_backend(path).ok
    assert polkit.calls() == []


def test_flatpak_app_id_detail_comes_from_the_callers_root(
    sys_env: SystemSetup, polkit: RecordingPolkit
) -> None:
    """A Flatpak app sees its /.flatpak-info at its root; the daemon reads it through
    /proc/PID/root. Any user can build such a root (user namespace + chroot), so the detail
    can only narrow what rules allow, never widen it (docs/threat-model.md)."""
    root = public_dir("vhostuserd-flatpak-root-")
    try:
        (root / ".flatpak-info").write_text("[Application]\nname=org.example.Viewer\n")
        polkit.answer({SPAWN: [True, False]})
        caller = sys_env.callers(NOBODY)
        r = caller.fake_root(root)
        if not r.ok:
            pytest.skip(
                f"this machine does not allow unprivileged user namespaces: {r.local_error}"
            )
        assert caller.spawn("50-gpu.json").ok
        [call] = polkit.calls()
        assert call["details"]["flatpak-app-id"] == "org.example.Viewer"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_app_id_lookup_that_hangs_fails_closed_without_blocking_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A /.flatpak-info on a FUSE mount that never answers hangs open(2); the lookup runs
    in a thread of its own and the call is refused after the timeout, while the event loop
    goes on serving others."""
    release = threading.Event()

    def hangs(pid: int) -> str | None:
        release.wait(10)
        return "never.seen"

    monkeypatch.setattr(authority, "flatpak_app_id", hangs)

    async def main() -> tuple[str, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.ensure_future(ticker())
        start = time.monotonic()
        try:
            await authority.caller_app_id(1234, timeout=0.3)
        except BrokerError as e:
            message = f"{e.dbus_name}: {e}"
        else:
            message = "no error"
        assert time.monotonic() - start < 5
        t.cancel()
        return message, ticks

    try:
        message, ticks = asyncio.run(main())
    finally:
        release.set()
    assert message.startswith("org.vhostuserd.Broker1.Error.NotAuthorized"), message
    assert "flatpak-info" in message, message
    assert ticks >= 5, "the event loop was blocked while the lookup hung"
