"""A daemon that goes away and comes back (docs/contract.md section 2, --state-dir).

Backends outlive their daemon, SIGKILLed or stopped with SIGTERM; they are recorded in the
state directory, and the next daemon re-adopts every one still alive, under its original
id, stops those whose owner left the bus meanwhile (unless detached), and can stop the
rest. Their exit status cannot be known then (they are not its children): -1 / -1. No
backend process is left behind, alive or zombie.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from busutil import Daemon, PrivateBus, Tree, await_for, run
from helpers_spawn import Client, Fake, Timer, alive, install, kill_marked, spawn, wait_none_marked

StartDaemon = Callable[..., Daemon]
GRACE = 1.0
KEYS = (
    "id",
    "descriptor",
    "binary",
    "argv",
    "pid",
    "owner_uid",
    "owner",
    "detached",
    "started_at",
    "object",
)


@pytest.fixture(autouse=True)
def no_leftovers(tree: Tree) -> Iterator[None]:
    yield
    kill_marked(tree)


def state_dir(tree: Tree) -> str:
    return os.path.join(tree.env()["XDG_RUNTIME_DIR"], "vhostuserd")


def as_listed(props: dict[str, Any], path: str) -> dict[str, Any]:
    """Backend properties as the ListBackends keys of docs/contract.md section 3."""
    names = {
        "Id": "id",
        "Descriptor": "descriptor",
        "Binary": "binary",
        "Argv": "argv",
        "Pid": "pid",
        "OwnerUid": "owner_uid",
        "Owner": "owner",
        "Detached": "detached",
        "StartedAt": "started_at",
    }
    out = {names[k]: v for k, v in props.items() if k in names}
    out["object"] = path
    return out


def test_a_sigkilled_daemon_restarted_readopts_every_live_backend(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    polite = install(tree, "honours_sigterm", "gpu", [], short="polite")
    stubborn = install(tree, "ignores_sigterm", "gpu", [], short="stubborn")
    forks = install(tree, "forks_grandchild", "gpu", [], short="forks")
    first = start_daemon("--grace-period", str(GRACE))

    async def main() -> None:
        # a: detached backends, then leaves before the crash. b: stays connected throughout.
        # c: leaves while no daemon runs.
        a, b, c = (
            await Client.open(bus.address, record=False),
            await Client.open(bus.address, record=False),
            await Client.open(bus.address, record=False),
        )
        plan: list[tuple[Client, Fake, bool, str]] = [
            (a, polite, True, "a"),
            (a, polite, True, "a"),
            (a, stubborn, True, "a"),
            (a, forks, True, "a"),
            (b, polite, False, "b"),
            (b, stubborn, False, "b"),
            (b, forks, False, "b"),
            (c, polite, False, "c"),
            (c, stubborn, False, "c"),
            (c, forks, False, "c"),
        ]
        started: dict[str, dict[str, Any]] = {}
        group: dict[str, str] = {}
        grandchildren = []
        for client, fake, detach, who in plan:
            path, props = await spawn(client, fake, tree.root, {"detach": detach})
            report = fake.report(props["Pid"])
            grandchildren += [report["grandchild"]] if "grandchild" in report else []
            started[path] = as_listed(props, path)
            group[path] = who
        assert len({p["id"] for p in started.values()}) == 10
        await a.close()

        assert first.stop(signal.SIGKILL) == -signal.SIGKILL
        # Nothing died with the daemon.
        assert all(alive(p["pid"]) for p in started.values())
        await c.close()
        second = start_daemon("--grace-period", str(GRACE))

        # Every one of them is back, under its id, as it was.
        listed = {x["object"]: x for x in await b.list_backends()}
        assert set(listed) == set(started), set(started) ^ set(listed)
        for path, before in started.items():
            assert {k: listed[path][k] for k in KEYS} == before, path

        # c's three are stopped (c left while we were away); the others keep running. Dead,
        # that is: reaping them is up to whoever adopted them when the first daemon died.
        t = Timer()
        for path, who in group.items():
            if who == "c":
                await await_for(
                    lambda p=started[path]["pid"]: not alive(p),
                    f"{path} of the departed owner to die",
                    GRACE + 1,
                )
        assert t.elapsed <= GRACE + 1, t.elapsed
        # Listed as exited for a moment (they may have exited before the daemon took its
        # name, so no Exited signal reached a match on the name), status unknown.
        gone_ones = [p for p, who in group.items() if who == "c"]
        last: dict[str, Any] = {}

        async def all_exited() -> bool:
            last.update({x["object"]: x for x in await b.list_backends()})
            return all(last[p]["state"] == "exited" for p in gone_ones)

        await await_for(all_exited, lambda: f"c's backends listed as exited: {last}")
        assert all(
            (last[p]["exit_status"], last[p]["exit_signal"]) == (-1, -1) for p in gone_ones
        ), last
        for path, who in group.items():
            if who != "c":
                assert alive(started[path]["pid"]), (path, who)

        # The re-adopted ones can be stopped, SIGKILL after the grace period included;
        # their status is unknown to a daemon that is not their parent.
        for path, who in group.items():
            if who == "c":
                continue
            t = Timer()
            await b.stop(path)
            assert not alive(started[path]["pid"]), path
            assert t.elapsed < GRACE + 1.5
            after = await b.backend(path)
            assert (after["State"], after["ExitStatus"], after["ExitSignal"]) == (
                "exited",
                -1,
                -1,
            ), after
        await await_for(
            lambda: not any(alive(g) for g in grandchildren), "the forked helpers to die", 2.0
        )
        await b.close()
        assert second.proc.poll() is None
        second.assert_clean_log()

    run(main())
    # No orphan, no zombie (given a reaper above us, as tini -s is in CI): the helpers the
    # forking backends started died with their groups.
    wait_none_marked(tree, 5.0)
    assert not any(name.startswith("backend-") for name in os.listdir(state_dir(tree)))


def test_sigterm_to_the_daemon_leaves_backends_running_and_recorded(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    polite = install(tree, "honours_sigterm", "gpu", [], short="polite")
    first = start_daemon()

    async def main() -> None:
        c = await Client.open(bus.address, record=False)
        kept_path, kept = await spawn(c, polite, tree.root, {"detach": True})
        owned_path, owned = await spawn(c, polite, tree.root)
        for props in (kept, owned):
            polite.report(props["Pid"])

        assert first.stop(signal.SIGTERM) == 0
        assert alive(kept["Pid"]) and alive(owned["Pid"])
        for props in (kept, owned):
            record_path = os.path.join(state_dir(tree), f"backend-{props['Id']}.json")
            with open(record_path) as f:  # noqa: ASYNC230 - a small local file; nothing else waits
                record = json.load(f)
            got = (
                record["id"],
                record["pid"],
                record["descriptor"],
                record["argv"],
                record["detached"],
            )
            assert got == (props["Id"], props["Pid"], polite.name, props["Argv"], props["Detached"])

        # The next daemon takes both back; the owner of the attached one is still here,
        # so it keeps running.
        start_daemon()
        listed = {x["object"]: x for x in await c.list_backends()}
        assert set(listed) == {kept_path, owned_path}
        assert all(x["state"] == "running" for x in listed.values()), listed
        assert alive(owned["Pid"])
        for path, props in ((kept_path, kept), (owned_path, owned)):
            await c.stop(path)
            # Dead when Stop returns; reaped by whoever adopted it when the first daemon left.
            assert not alive(props["Pid"])
        await c.close()

    run(main())
    wait_none_marked(tree, 5.0)
    assert not any(name.startswith("backend-") for name in os.listdir(state_dir(tree)))
