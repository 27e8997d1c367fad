"""The system service against the REAL polkitd, with our actions installed.

polkitd reads its actions and rules from fixed directories, so it runs in a private mount
namespace in which our polkit/org.vhostuserd.policy and a rules directory of the test's
choosing are bind-mounted over them (the technique of test_system_files.py). It serves a
private system bus (it honours DBUS_SYSTEM_BUS_ADDRESS), where the real vhostuserd runs
with --system. The caller, uid 65534, is in no login session, so without a rule the
allow_any default (auth_admin) applies: authentication, which a call without interactive
authorization cannot get. A rule naming that user and the descriptor makes it a yes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from busutil import PrivateBus, Tree, stop_process
from helpers_auth import NOBODY, POLKIT_NAME, SPAWN, SystemSetup, backend_pid, setup
from helpers_spawn import ids, status

REPO = Path(__file__).resolve().parent.parent
POLKITD = "/usr/lib/polkit-1/polkitd"
POLICY = REPO / "polkit" / "org.vhostuserd.policy"
INTERACTIVE_REQUIRED = "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"
FIXED_DIRS = ("/usr/share/polkit-1/actions", "/usr/share/polkit-1/rules.d", "/etc/polkit-1/rules.d")

NOBODY_MAY_SPAWN_GPU = """
polkit.addRule(function(action, subject) {
    if (action.id === "org.vhostuserd.spawn" && subject.user === "nobody" &&
        action.lookup("descriptor") === "50-gpu.json" && action.lookup("type") === "gpu") {
        return polkit.Result.YES;
    }
});
"""


def why_polkitd_cannot_run() -> str | None:
    for tool in (POLKITD, "unshare", "mount"):
        if shutil.which(tool) is None and not os.access(tool, os.X_OK):
            return f"{tool} is not installed (scripts/setup installs polkitd)"
    if os.geteuid() != 0:
        return "needs root, to bind-mount our actions and rules over polkitd's fixed directories"
    for d in FIXED_DIRS:
        if not os.path.isdir(d):
            return f"{d} does not exist here, so there is nothing to bind-mount over"
    if subprocess.run(["unshare", "-m", "true"], capture_output=True, check=False).returncode != 0:
        return "cannot create a mount namespace here (unshare -m failed)"
    return None


@pytest.fixture
def polkitd(sysbus: PrivateBus, tmp_path: Path) -> Iterator[Callable[[str], None]]:
    """start(rules_js): the real polkitd with our actions and only these rules."""
    reason = why_polkitd_cannot_run()
    if reason is not None:
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    procs: list[subprocess.Popen[str]] = []

    def start(rules: str) -> None:
        actions, rules_dir, empty = tmp_path / "actions", tmp_path / "rules", tmp_path / "empty"
        for d in (actions, rules_dir, empty):
            d.mkdir()
            d.chmod(0o755)
        shutil.copy(POLICY, actions / POLICY.name)
        if rules:
            (rules_dir / "50-test.rules").write_text(rules)
        env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": sysbus.address}
        script = (
            f"mount --bind {actions} /usr/share/polkit-1/actions && "
            f"mount --bind {rules_dir} /etc/polkit-1/rules.d && "
            f"mount --bind {empty} /usr/share/polkit-1/rules.d && "
            f"exec {POLKITD} --no-debug"
        )
        proc = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        procs.append(proc)
        deadline = time.monotonic() + 20
        while not sysbus.name_has_owner(POLKIT_NAME):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                out = proc.communicate()[0]
                if "mount" in out and proc.returncode not in (None, 0):
                    pytest.skip(f"polkitd cannot run here: {out.strip()[:300]}")
                pytest.fail(f"polkitd did not take {POLKIT_NAME}: {out}")
            time.sleep(0.05)

    yield start
    for proc in procs:
        stop_process(proc, timeout=10)
        if proc.stdout:
            proc.stdout.close()
    deadline = time.monotonic() + 10
    while sysbus.name_has_owner(POLKIT_NAME) and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.fixture
def sys_env(sysbus: PrivateBus, tmp_path: Path) -> Iterator[SystemSetup]:
    tree_root = tmp_path / "tree"
    tree_root.mkdir()
    yield from setup(sysbus, Tree.make(tree_root))


def test_without_a_rule_the_unprivileged_caller_is_refused(
    polkitd: Callable[[str], None], sys_env: SystemSetup
) -> None:
    polkitd("")
    caller = sys_env.callers(NOBODY)
    # auth_admin with no interaction allowed: polkit's answer is a challenge.
    r = caller.spawn("50-gpu.json")
    assert r.error == INTERACTIVE_REQUIRED, str(r)
    assert SPAWN in r.message and "call again" in r.message, r.message
    # Interaction allowed, but no authentication agent to ask: still a challenge (as sd-bus
    # reports it), and the message no longer tells the caller to allow interaction.
    r = caller.spawn("50-gpu.json", interactive=True)
    assert r.error == INTERACTIVE_REQUIRED, str(r)
    assert "agent" in r.message and "call again" not in r.message, r.message
    assert sys_env.running() == []
    assert sys_env.admin().backends() == []


def test_a_rule_for_the_caller_lets_it_spawn_as_itself(
    polkitd: Callable[[str], None], sys_env: SystemSetup
) -> None:
    polkitd(NOBODY_MAY_SPAWN_GPU)
    caller = sys_env.callers(NOBODY)
    r = caller.spawn("50-gpu.json")
    assert r.ok, f"{r}\n{sys_env.daemon.log()}"
    st = status(backend_pid(sys_env.admin(), r.body[0]))
    assert ids(st["Uid"]) == [NOBODY] * 4
    assert st["NoNewPrivs"].strip() == "1"
    # The rule matched on the details the daemon passed: another descriptor is still refused.
    r = caller.spawn("50-fs-o.json", {"shared-dir": ("s", "/srv")}, fd="listen")
    assert r.error == INTERACTIVE_REQUIRED, str(r)
    assert len(sys_env.running()) == 1
