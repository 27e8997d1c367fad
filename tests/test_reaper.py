"""procs.Reaper with real processes: whichever path sees a watched child's exit first (its
pidfd or the SIGCHLD sweep), the child's hook runs while it is still an unreaped zombie, so
its process group can be dealt with before its pid (and group number) is free; and group
signals through a pidfd reach the group even after the leader is reaped, but nothing else.
"""

from __future__ import annotations

import asyncio
import os
import signal

from busutil import wait_for

from vhostuserd.edges import procs


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except OSError:
        return None


def _leader_with_helper() -> tuple[int, int]:
    """A child of ours in its own session that exits at once, leaving a helper in its group:
    (leader pid, helper pid), the leader an unreaped zombie by the time this returns."""
    r, w = os.pipe2(os.O_CLOEXEC)
    null = procs.open_devnull()
    try:
        pid = procs.spawn(["/bin/sh", "-c", "sleep 30 & echo $!"], fds={0: null, 1: w, 2: null})
    finally:
        os.close(w)
        os.close(null)
    with os.fdopen(r) as f:
        helper = int(f.readline())
    wait_for(lambda: _state(pid) == "Z", "the leader to exit")
    return pid, helper


def test_the_sweep_runs_the_hook_before_it_reaps_a_watched_child() -> None:
    async def main() -> None:
        reaper = procs.Reaper(asyncio.get_running_loop())
        reaper.install()
        try:
            pid, helper = _leader_with_helper()
            pidfd = os.pidfd_open(pid)
            seen: list[str | None] = []

            def hook() -> None:
                seen.append(_state(pid))
                procs.signal_group(pidfd, pid, signal.SIGKILL, leader_unreaped=True)

            exited = reaper.watch(pid, pidfd, hook)
            reaper._sweep()  # the SIGCHLD path first, before the loop sees the pidfd
            assert seen == ["Z"], "the hook ran after the child was reaped"
            assert exited.done() and os.WIFEXITED(exited.result())
            assert _state(pid) is None  # reaped now, by the sweep
            await asyncio.sleep(0)
            assert seen == ["Z"], "the hook ran twice"
            wait_for(
                lambda: _state(helper) in (None, "Z"), "the helper to be killed with the group"
            )
            os.close(pidfd)
        finally:
            reaper.uninstall()

    asyncio.run(main())


def test_a_group_signal_through_a_pidfd_reaches_the_group_after_the_leader_is_reaped() -> None:
    """The pidfd holds the leader's struct pid, which the group's members still have as
    their group: the signal finds them with no number involved (the pid-reuse case itself
    is test_security_supervisor.py's pid namespace test)."""
    pid, helper = _leader_with_helper()
    pidfd = os.pidfd_open(pid)
    os.waitpid(pid, 0)  # the leader is reaped: its number is free to be reused from here on
    try:
        procs.signal_group(pidfd, pid, signal.SIGKILL, leader_unreaped=False)
        wait_for(
            lambda: _state(helper) in (None, "Z"),
            "the helper of the reaped leader's group to be killed",
        )
        # The group is empty now: no error either.
        procs.signal_group(pidfd, pid, signal.SIGKILL, leader_unreaped=False)
    finally:
        os.close(pidfd)


def test_a_child_starts_with_every_signal_at_its_default_even_when_the_daemon_ignores_some() -> (
    None
):
    """A daemon started from a background shell has SIGINT and SIGQUIT ignored; its backends
    must not inherit that (only SIGPIPE stays ignored when asked for)."""
    old = {
        s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP)
    }
    null = procs.open_devnull()
    try:
        pid = procs.spawn(
            ["/bin/sleep", "30"], fds={0: null, 1: null, 2: null}, keep_sigpipe_ignored=True
        )
    finally:
        os.close(null)
        for s, h in old.items():
            signal.signal(s, h)
    try:
        with open(f"/proc/{pid}/status") as f:
            ign = int(next(line for line in f if line.startswith("SigIgn:")).split()[1], 16)
        # glibc's posix_spawn leaves its internal signals 32 and 33 ignored in every child.
        allowed = (1 << (signal.SIGPIPE - 1)) | (1 << 31) | (1 << 32)
        assert ign & ~allowed == 0, [n + 1 for n in range(64) if ign >> n & 1]
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
