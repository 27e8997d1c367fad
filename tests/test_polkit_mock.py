"""The system service's polkit checks against python-dbusmock's polkitd template.

The template runs as its own process (Debian's /usr/bin/python3, where python3-dbusmock is
installed) on a private system bus, and the real vhostuserd runs as
`vhostuserd --system --address ADDR`, so it asks that mock for every authorization.
Callers are real processes of uid 65534 (nobody) or another unprivileged uid; the mock
is driven through its org.freedesktop.DBus.Mock interface (SetAllowed, SimulateHang,
ReleaseHangingCalls) and its call log tells which actions were asked about.
"""

from __future__ import annotations

import glob
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from busutil import PrivateBus, Tree, wait_for
from helpers_auth import (
    BACKEND_IFACE,
    MANAGE,
    NOBODY,
    OTHER_UID,
    SPAWN,
    SPAWN_DEVICE,
    DbusmockPolkit,
    SystemSetup,
    backend_pid,
    setup,
    wait_gone,
)
from helpers_spawn import ids, status


@pytest.fixture
def sys_env(sysbus: PrivateBus, polkit: DbusmockPolkit, tmp_path: Path) -> Iterator[SystemSetup]:
    polkit.reset()
    yield from setup(sysbus, Tree.make(tmp_path))


def test_allowed_spawn_runs_the_backend_as_the_caller_with_no_new_privs(
    sys_env: SystemSetup, polkit: DbusmockPolkit
) -> None:
    polkit.set_allowed(SPAWN)
    caller = sys_env.callers(NOBODY)
    r = caller.spawn("50-gpu.json")
    assert r.ok, str(r)
    admin = sys_env.admin()
    pid = backend_pid(admin, r.body[0])
    st = status(pid)
    assert ids(st["Uid"]) == [NOBODY] * 4, st["Uid"]
    assert ids(st["Gid"]) == [NOBODY] * 4, st["Gid"]
    assert all(g != 0 for g in ids(st["Groups"])), st["Groups"]
    assert st["NoNewPrivs"].strip() == "1"
    assert admin.prop("OwnerUid", r.body[0], BACKEND_IFACE) == NOBODY
    assert admin.prop("Owner", r.body[0], BACKEND_IFACE) == caller.name
    # Asked once, about the spawn action, with the details rules match on.
    [(action, details, _flags)] = polkit.checks()
    assert action == SPAWN
    assert details["descriptor"] == "50-gpu.json" and details["type"] == "gpu"
    assert sys_env.running() == [pid]


def test_denied_spawn_is_not_authorized_and_names_the_action(
    sys_env: SystemSetup, polkit: DbusmockPolkit
) -> None:
    polkit.set_allowed()  # the template's default, made explicit
    caller = sys_env.callers(NOBODY)
    message = caller.spawn("50-gpu.json").expect_error("NotAuthorized")
    assert SPAWN in message and str(NOBODY) in message, message
    assert polkit.actions() == [SPAWN]
    assert sys_env.running() == []
    assert sys_env.admin().backends() == []
    # Allowing something else does not help.
    polkit.set_allowed(MANAGE, SPAWN_DEVICE)
    assert SPAWN in caller.spawn("50-gpu.json").expect_error("NotAuthorized")
    assert sys_env.running() == []


def test_device_option_that_is_not_such_a_device_fails_before_polkit_is_asked(
    sys_env: SystemSetup, polkit: DbusmockPolkit
) -> None:
    # Which paths are such devices is policy.device_error's rule, case by case in
    # tests/test_policy.py (on real paths too); here: the daemon checks before it asks polkit.
    polkit.set_allowed(SPAWN, SPAWN_DEVICE)
    caller = sys_env.callers(NOBODY)
    message = caller.spawn("50-gpu.json", {"render-node": ("s", "/dev/dri/../null")}).expect_error(
        "InvalidOption"
    )
    assert "render-node" in message and "/dev/dri/" in message, message
    assert polkit.checks() == [], "polkit was asked about a request that could never run"
    assert sys_env.running() == []


def _render_node() -> str | None:
    for path in sorted(glob.glob("/dev/dri/renderD*")):
        if stat.S_ISCHR(os.stat(path).st_mode):
            return path
    return None


def test_device_option_needs_spawn_device_as_well(
    sys_env: SystemSetup, polkit: DbusmockPolkit
) -> None:
    node = _render_node()
    if node is None:
        pytest.skip(
            "no /dev/dri/renderD* character device on this machine (and tests cannot make one); "
            "the non-device cases above still run"
        )
    polkit.set_allowed(SPAWN)
    caller = sys_env.callers(NOBODY)
    message = caller.spawn("50-gpu.json", {"render-node": ("s", node)}).expect_error(
        "NotAuthorized"
    )
    assert SPAWN_DEVICE in message, message
    assert polkit.actions() == [SPAWN, SPAWN_DEVICE]
    assert sys_env.running() == []
    polkit.set_allowed(SPAWN, SPAWN_DEVICE)
    r = caller.spawn("50-gpu.json", {"render-node": ("s", node)})
    assert r.ok, str(r)
    st = status(backend_pid(sys_env.admin(), r.body[0]))
    # The backend gets the node's group, and nothing else beyond the caller's own.
    assert os.stat(node).st_gid in ids(st["Groups"]), st["Groups"]
    assert ids(st["Uid"]) == [NOBODY] * 4


def test_caller_that_leaves_during_a_slow_polkit_answer_gets_nothing_started(
    sys_env: SystemSetup, polkit: DbusmockPolkit
) -> None:
    polkit.set_allowed(SPAWN)
    polkit.simulate_hang(True)
    leaver = sys_env.callers(NOBODY)
    leaver.send_spawn("50-gpu.json", {"settle-ms": ("u", 0)})
    wait_for(polkit.hanging, "the Spawn to reach polkit")
    admin = sys_env.admin()
    assert len(admin.descriptors()) == 4, "a pending polkit check held up other callers"
    leaver.kill()
    wait_for(lambda: not sys_env.bus.name_has_owner(leaver.name), "the caller to leave the bus")
    polkit.release()  # the answer is "yes", for a caller that is gone
    polkit.simulate_hang(False)
    wait_for(
        lambda: f"{leaver.name} (uid {NOBODY}) may {SPAWN}" in sys_env.daemon.log(),
        "the daemon to get polkit's answer",
    )
    assert admin.backends() == []  # a round trip after the answer: the daemon has acted on it
    assert sys_env.running() == []
    assert " started: pid " not in sys_env.daemon.log(), sys_env.daemon.log()
    # The control: the same sequence with a caller that stays does start the backend.
    polkit.simulate_hang(True)
    stayer = sys_env.callers(NOBODY)
    n = stayer.send_spawn("50-gpu.json", {"settle-ms": ("u", 0)})
    wait_for(polkit.hanging, "the second Spawn to reach polkit")
    polkit.release()
    polkit.simulate_hang(False)
    r = stayer.result(n)
    assert r.ok, str(r)
    # With settle-ms 0 the reply can come while the launcher still execs its way to the backend
    # (cgroup entry, setpriv): its command line reads empty during each exec.
    wait_for(lambda: len(sys_env.running()) == 1, "the stayer's backend to be running")


def test_root_needs_no_polkit(sys_env: SystemSetup, polkit: DbusmockPolkit) -> None:
    polkit.set_allowed()  # deny everything
    admin = sys_env.admin()
    r = admin.spawn("50-gpu.json")
    assert r.ok, str(r)
    st = status(backend_pid(admin, r.body[0]))
    assert ids(st["Uid"]) == [0] * 4
    assert st["NoNewPrivs"].strip() == "1"
    assert isinstance(admin.call("Reload").body[0], int)
    assert polkit.checks() == [], "root was checked with polkit"


def test_reload_needs_manage(sys_env: SystemSetup, polkit: DbusmockPolkit) -> None:
    caller = sys_env.callers(NOBODY)
    polkit.set_allowed(SPAWN, SPAWN_DEVICE)
    message = caller.call("Reload").expect_error("NotAuthorized")
    assert MANAGE in message, message
    assert [(a, d) for a, d, _ in polkit.checks()] == [(MANAGE, {"request": "reload"})]
    polkit.set_allowed(MANAGE)
    r = caller.call("Reload")
    assert r.ok and isinstance(r.body[0], int), str(r)


def test_stop_of_another_uids_backend_needs_manage(
    sys_env: SystemSetup, polkit: DbusmockPolkit
) -> None:
    polkit.set_allowed(SPAWN)
    owner = sys_env.callers(OTHER_UID)
    r = owner.spawn("50-gpu.json")
    assert r.ok, str(r)
    path = r.body[0]
    pid = backend_pid(sys_env.admin(), path)
    assert ids(status(pid)["Uid"]) == [OTHER_UID] * 4
    other = sys_env.callers(NOBODY)
    polkit.clear_calls()
    message = other.stop_backend(path).expect_error("NotAuthorized")
    assert MANAGE in message and str(OTHER_UID) in message, message
    message = other.call("GetLog", path=path, interface=BACKEND_IFACE).expect_error("NotAuthorized")
    assert MANAGE in message, message
    assert polkit.actions() == [MANAGE, MANAGE]
    assert sys_env.running() == [pid], "a refused Stop stopped it anyway"
    polkit.set_allowed(SPAWN, MANAGE)
    r = other.stop_backend(path)
    assert r.ok, str(r)
    wait_gone(pid)
    assert sys_env.running() == []


def test_list_backends_shows_only_the_callers_own_unless_manage(
    sys_env: SystemSetup, polkit: DbusmockPolkit
) -> None:
    polkit.set_allowed(SPAWN)
    a, b = sys_env.callers(OTHER_UID), sys_env.callers(NOBODY)
    path_a = a.spawn("50-gpu.json").body[0]
    path_b = b.spawn("50-gpu.json").body[0]
    assert [x["object"] for x in a.backends()] == [path_a]
    assert [x["object"] for x in b.backends()] == [path_b]
    assert {x["owner_uid"] for x in b.backends()} == {NOBODY}
    polkit.set_allowed(SPAWN, MANAGE)
    assert sorted(x["object"] for x in b.backends()) == sorted([path_a, path_b])
    polkit.set_allowed()
    polkit.clear_calls()
    assert sorted(x["object"] for x in sys_env.admin().backends()) == sorted([path_a, path_b])
    assert polkit.checks() == []
