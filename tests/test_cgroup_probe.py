"""The capability probe never signals a process group by number once the probe may have been
reaped (issue 9, item 4's class of bug, in capabilities.py): run in a pid namespace of its
own, the probe's pid is handed to a new process leading its own group the moment the probe is
reaped, and that newcomer must survive the probe's clean-up. (PROBE_ROOT=DIR runs the
scenario against another checkout's vhostuserd package: before the fix it fails, the newcomer
SIGKILLed and the probe reported as "lingering-process".)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Runs as the init of a fresh pid namespace. The Reaper is the real one, but the moment it has
# reaped the probe (before it delivers the status) the freed pid goes to a new session leader,
# as it may on a busy machine: whatever the probe's clean-up does after that meets it.
SCENARIO = r"""
import asyncio, json, os, signal, sys
sys.path.insert(0, sys.argv[2])
from vhostuserd.edges import probe as capabilities, procs

victim = {}

def recycle(n):
    for _ in range(200):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(n - 1))
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                signal.set_wakeup_fd(-1)
                os.setsid()  # leads a group numbered n, as the probe's group was
                os.write(w, b"x")
                os.execv("/bin/sleep", ["sleep", "600"])
            finally:
                os._exit(127)
        os.close(w)
        os.read(r, 1)  # it leads its group now
        os.close(r)
        if pid == n:
            victim["pid"] = pid
            return
        os.kill(pid, 9); os.waitpid(pid, 0)

class RecyclingReaper(procs.Reaper):
    def _deliver(self, pid, status):
        # Reaped just now, its status not delivered yet: the pid is free for anyone.
        if pid in self._watched:
            recycle(pid)
        super()._deliver(pid, status)

async def main():
    reaper = RecyclingReaper(asyncio.get_running_loop())
    reaper.install()
    result = await capabilities.run_probe(sys.argv[1], "gpu", reaper, timeout=5)
    pid = victim.get("pid")
    try:  # (a killed victim may have been reaped by the Reaper's sweep already)
        alive = pid is not None and os.waitpid(pid, os.WNOHANG)[0] == 0
    except ChildProcessError:
        alive = False
    if alive:
        os.kill(pid, 9)
    print(json.dumps({"result": repr(result), "victim": pid, "alive": alive}), flush=True)

asyncio.run(main())
"""


def test_a_probes_recycled_pid_leading_a_new_group_is_never_killed_by_its_clean_up(
    tmp_path: Path,
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: a pid namespace and /proc/sys/kernel/ns_last_pid")
    if (
        subprocess.run(
            ["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, check=False
        ).returncode
        != 0
    ):
        pytest.skip("cannot create a pid namespace here (unshare --pid failed)")
    probe = tmp_path / "probe"
    probe.write_text('#!/bin/sh\necho \'{"type": "gpu"}\'\n')
    probe.chmod(0o755)
    script = tmp_path / "scenario.py"
    script.write_text(SCENARIO)
    out = subprocess.run(
        [
            "unshare",
            "--pid",
            "--fork",
            "--mount-proc",
            sys.executable,
            str(script),
            str(probe),
            os.environ.get("PROBE_ROOT", str(ROOT)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["victim"] is not None, f"the probe's pid was never recycled: {got}, {out.stderr}"
    assert "Capabilities" in got["result"], got  # the probe itself answered, and was not lingering
    assert got["alive"], (
        f"the process that got the probe's pid after it was reaped was killed: {got}"
    )
