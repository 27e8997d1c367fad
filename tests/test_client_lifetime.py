"""Whose backend is whose (docs/contract.md section 3: Spawn's `detach`, Stop, ListBackends).

A backend belongs to the connection that spawned it: when that connection leaves the bus
(it disconnects, or its process is SIGKILLed) its backends are stopped, unless detached.
Who may stop a backend or read its log (the owner's uid, root, holders of manage) is
`core.policy`'s rule, tested as a table in tests/test_policy.py (test_manage, and the session
service's own uid only); the bus side is test_privilege.py's and test_polkit_mock.py's.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator

import pytest
from busutil import Daemon, PrivateBus, Tree, await_for, run, wait_for
from helpers_spawn import (
    Client,
    Timer,
    alive,
    gone,
    install,
    kill_marked,
    proc_stat,
    spawn,
    wait_none_marked,
)

StartDaemon = Callable[..., Daemon]
GRACE = 1.0
NOBODY = 65534


@pytest.fixture(autouse=True)
def no_leftovers(tree: Tree) -> Iterator[None]:
    yield
    kill_marked(tree)


def test_a_disconnecting_client_loses_its_backends_but_not_the_detached_one(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    polite = install(tree, "honours_sigterm", "gpu", [], short="polite")
    stubborn = install(tree, "ignores_sigterm", "gpu", [], short="stubborn")
    start_daemon("--grace-period", str(GRACE))

    async def main() -> None:
        owner = await Client.open(bus.address, record=False)
        other = await Client.open(bus.address)
        owner_name = owner.unique_name
        _p1, a = await spawn(owner, polite, tree.root)
        _p2, b = await spawn(owner, stubborn, tree.root)
        kept_path, kept = await spawn(owner, polite, tree.root, {"detach": True})
        for fake, props in ((polite, a), (stubborn, b), (polite, kept)):
            fake.report(props["Pid"])

        t = Timer()
        await owner.close()
        for props in (a, b):
            await await_for(
                lambda p=props["Pid"]: gone(p), f"backend {props['Id']} to be gone", GRACE + 1
            )
        elapsed = t.elapsed
        assert elapsed <= GRACE + 1, elapsed
        # The stubborn one took the grace period to die; had the detached one (which honours
        # SIGTERM) been stopped too, it would be gone by now. It lives on, listed, still
        # showing who started it.
        assert elapsed >= GRACE
        assert alive(kept["Pid"]), proc_stat(kept["Pid"])
        listed = {x["id"]: x for x in await other.list_backends()}
        assert listed[kept["Id"]]["state"] == "running"
        assert listed[kept["Id"]]["owner_uid"] == os.getuid()
        assert listed[kept["Id"]]["owner"] == owner_name
        assert listed[kept["Id"]]["detached"] is True
        for props in (a, b):
            assert listed.get(props["Id"], {"state": "exited"})["state"] == "exited"
        # Another connection of the same uid may stop it, and read its log first.
        assert "fake backend report:" in await other.get_log(kept_path)
        await other.stop(kept_path)
        assert gone(kept["Pid"])
        await other.close()

    run(main())
    wait_none_marked(tree, 2.0)


CLIENT = textwrap.dedent("""
    import asyncio, json, socket, sys
    from vhostuserd.client import BrokerClient

    async def main():
        c = await BrokerClient.connect("address", sys.argv[1])
        out = {"unique": c.bus.unique_name}
        keep = []
        for key, name, detach in (("polite", sys.argv[2], False), ("stubborn", sys.argv[3], False),
                                  ("detached", sys.argv[2], True)):
            ours, theirs = socket.socketpair()
            keep.append(ours)
            out[key] = await c.spawn(name, theirs.fileno(), {"detach": detach})
            theirs.close()
        print(json.dumps(out), flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
""")


def test_a_sigkilled_client_loses_its_backends_but_not_the_detached_one(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    polite = install(tree, "honours_sigterm", "gpu", [], short="polite")
    stubborn = install(tree, "ignores_sigterm", "gpu", [], short="stubborn")
    start_daemon("--grace-period", str(GRACE))
    script = tree.root / "client.py"
    script.write_text(CLIENT)
    client = subprocess.Popen(
        [sys.executable, str(script), bus.address, polite.name, stubborn.name],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=tree.env(),
    )
    try:
        assert client.stdout is not None
        ready, _, _ = select.select([client.stdout], [], [], 20)
        line = client.stdout.readline() if ready else b""
        if not line:
            client.kill()
            raise AssertionError(f"the client printed nothing: {client.communicate()[1]!r}")
        paths = json.loads(line)

        async def props() -> dict[str, dict[str, object]]:
            c = await Client.open(bus.address, record=False)
            out = {k: await c.backend(paths[k]) for k in ("polite", "stubborn", "detached")}
            await c.close()
            return out

        before = run(props())
        polite.report(int(before["polite"]["Pid"]))  # type: ignore[arg-type]
        stubborn.report(int(before["stubborn"]["Pid"]))  # type: ignore[arg-type]
        assert {p["Owner"] for p in before.values()} == {paths["unique"]}

        t = Timer()
        client.kill()
        client.wait()
        for key in ("polite", "stubborn"):
            pid = int(before[key]["Pid"])  # type: ignore[arg-type]
            wait_for(lambda p=pid: gone(p), f"the {key} backend to be gone", GRACE + 1)
        assert t.elapsed <= GRACE + 1, t.elapsed

        async def after() -> None:
            c = await Client.open(bus.address, record=False)
            listed = {x["object"]: x for x in await c.list_backends()}
            kept = listed[paths["detached"]]
            assert (kept["state"], kept["owner_uid"], kept["detached"]) == (
                "running",
                os.getuid(),
                True,
            )
            assert not gone(kept["pid"])
            await c.stop(paths["detached"])
            assert gone(kept["pid"])
            await c.close()

        run(after())
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        for f in (client.stdout, client.stderr):
            if f:
                f.close()
    wait_none_marked(tree, 2.0)
