"""``vhostuserctl --allow-interactive-authorization`` against the REAL polkitd (issue 11, point 7).

The system service on a private system bus with the real polkitd (the fixtures of
test_polkit_real.py); the caller is ``vhostuserctl`` itself, run as uid 65534, which is in no
login session, so polkit's answer for org.vhostuserd.spawn is "authenticate". Without the flag
the CLI says how to allow it; with the flag the daemon is told interaction is allowed (and,
with no authentication agent to ask, polkit still cannot say yes).
"""

from __future__ import annotations

import os
import subprocess

import pytest
from busutil import VHOSTUSERCTL
from helpers_auth import NOBODY, SystemSetup
from test_polkit_real import polkitd, sys_env  # noqa: F401 - the fixtures

FLAG = "--allow-interactive-authorization"


def ctl_as_nobody(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            VHOSTUSERCTL,
            "--address",
            address,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        stdin=subprocess.DEVNULL,
        check=False,
        env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": "/nonexistent",
            "LANG": "C.UTF-8",
        },
    )


def test_spawn_without_the_flag_says_how_to_allow_authentication_and_with_it_asks(
    polkitd, sys_env: SystemSetup
) -> None:  # noqa: F811 - the imported fixtures
    if os.geteuid() != 0:
        pytest.skip("needs root, to run the CLI as uid 65534")
    polkitd("")
    address = sys_env.bus.address
    spawn = ["spawn", "50-gpu.json", "--exec", "--", "true"]
    r = ctl_as_nobody(address, *spawn)
    assert r.returncode == 1 and r.stdout == "", r
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert "org.vhostuserd.spawn" in r.stderr and f"re-run with {FLAG}" in r.stderr, r.stderr
    # With the flag the message's ALLOW_INTERACTIVE_AUTHORIZATION is set: polkit tried to ask,
    # and had no agent to ask through.
    r = ctl_as_nobody(address, FLAG, *spawn)
    assert r.returncode == 1, r
    assert "agent" in r.stderr and FLAG not in r.stderr and "call again" not in r.stderr, r.stderr
    # The subcommand takes the flag too, and --json gives the typed error name.
    r = ctl_as_nobody(address, "--json", *spawn[:2], FLAG, *spawn[2:])
    assert r.returncode == 1, r
    assert '"error": "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"' in r.stderr, (
        r.stderr
    )
    assert sys_env.running() == []
