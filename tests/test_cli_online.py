"""``vhostuserctl`` against the running daemon (docs/contract.md section 4), as real subprocesses.

Human output is aligned tables; ``--json`` has the shapes of docs/json.md; a failed
request exits 1 with its reason on stderr; ``monitor --json`` streams one object per line;
without a daemon the CLI says in one line to try ``--offline``; ``status``, ``reload``,
``stop`` and ``monitor`` say what happened in words.
"""

from __future__ import annotations

import json
import queue
import re
import signal
import subprocess
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from busutil import (
    MANAGER_PATH,
    VHOSTUSERCTL,
    Daemon,
    PrivateBus,
    Tree,
    await_for,
    ctl,
    descriptor,
    fake_backend,
    run,
    wait_for,
)
from helpers_live import Listener, MatchWatcher, listen
from helpers_spawn import install, kill_marked

from vhostuserd import __version__
from vhostuserd.bus.manager import descriptor_path
from vhostuserd.client import DescriptorInfo

StartDaemon = Callable[..., Daemon]

# docs/json.md: every key of a Descriptor is always there, null when unknown.
DICT_KEYS = {
    "name",
    "path",
    "tier",
    "type",
    "description",
    "binary",
    "tags",
    "object",
    "probed",
    "features",
    "probe_error",
}


def setup(tree: Tree) -> dict[str, str]:
    """Three descriptors: a gpu with features, an input, a gpu whose probe fails."""
    gpu = fake_backend(tree.root / "gpu-backend", "gpu", ["virgl", "render-node"])
    inp = fake_backend(tree.root / "input-backend", "input", [])
    tree.write("data", "50-gpu.json", {**descriptor("gpu", gpu, "a gpu"), "tags": ["fast"]})
    tree.write("sysconf", "60-input.json", descriptor("input", inp, "keyboard"))
    tree.write("data", "70-nobinary.json", descriptor("gpu", "/nonexistent/gpu", "gone"), index=1)
    return {"gpu": gpu, "input": inp}


async def probed(L: Listener) -> list[dict[str, Any]]:
    last: list[dict[str, Any]] = []

    async def done() -> bool:
        nonlocal last
        last = await L.descriptors()
        return len(last) == 3 and all("features" in d or "probe_error" in d for d in last)

    await await_for(done, lambda: f"three probed descriptors; have {last}")
    return last


# docs/json.md: an Event has every key, null where it does not apply.
NO_EVENT: dict[str, Any] = {
    k: None
    for k in (
        "object",
        "generation",
        "name",
        "descriptor",
        "backend",
        "state",
        "exit_status",
        "exit_signal",
    )
}


def as_json_shape(d: dict[str, Any]) -> dict[str, Any]:
    """A ListDescriptors dict in the one JSON shape of docs/json.md."""
    return DescriptorInfo.from_dict(d).as_dict()


def daemon_view(bus: PrivateBus) -> list[dict[str, Any]]:
    async def main() -> list[dict[str, Any]]:
        async with await listen(bus.address) as L:
            return await probed(L)

    return run(main())


def ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, (r.args, r.returncode, r.stdout, r.stderr)
    assert r.stderr == "", r.stderr
    return r.stdout


def failed(r: subprocess.CompletedProcess[str]) -> str:
    """Exit 1, nothing on stdout, one line on stderr; that line."""
    assert r.returncode == 1, (r.args, r.returncode, r.stdout, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("vhostuserctl: "), lines
    return lines[0]


def assert_aligned(text: str, header: list[str], rows: list[list[str]]) -> None:
    """``text`` is a table with ``header`` and ``rows``: every cell starts at its column
    (a footnote may follow the table after a blank line)."""
    lines = text.rstrip("\n").split("\n\n")[0].split("\n")
    assert len(lines) == 1 + len(rows), text
    cols = [lines[0].index(h) for h in header]
    assert cols == sorted(cols) and cols[0] == 0
    for line, cells in zip(lines, [header, *rows], strict=True):
        for i, (col, cell) in enumerate(zip(cols, cells, strict=True)):
            assert line[col:].startswith(cell), (line, cell)
            end = cols[i + 1] if i + 1 < len(cols) else len(line)
            assert line[col + len(cell) : end].strip() == "", (line, cell)


def test_list_table_and_json(bus: PrivateBus, tree: Tree, start_daemon: StartDaemon) -> None:
    bins = setup(tree)
    d = start_daemon()
    view = daemon_view(bus)
    with ThreadPoolExecutor(4) as pool:
        table, as_json, gpus, none = pool.map(
            lambda args: ctl(bus, tree, *args),
            [
                ["list"],
                ["--json", "list"],
                ["list", "--type", "gpu", "--json"],
                ["list", "--type", "nosuch"],
            ],
        )
    assert_aligned(
        ok(table),
        ["NAME", "TYPE", "TIER", "BINARY", "FEATURES"],
        [
            ["50-gpu.json", "gpu", "data", bins["gpu"], "virgl,render-node"],
            ["60-input.json", "input", "sysconf", bins["input"], "(none)"],
            ["70-nobinary.json", "gpu", "data", "/nonexistent/gpu", "probe failed"],
        ],
    )
    items = json.loads(ok(as_json))
    assert items == [as_json_shape(v) for v in view]
    assert [set(i) for i in items] == [DICT_KEYS] * 3
    assert [(i["probed"], i["probe_error"] is None) for i in items] == [
        (True, True),
        (True, True),
        (True, False),
    ]
    assert items[0]["object"] == descriptor_path("50-gpu.json")
    assert items[0]["tags"] == ["fast"] and items[0]["features"] == ["virgl", "render-node"]
    assert json.loads(ok(gpus)) == [items[0], items[2]]
    assert ok(none) == "no descriptors\n"
    d.assert_clean_log()


def test_show(bus: PrivateBus, tree: Tree, start_daemon: StartDaemon) -> None:
    bins = setup(tree)
    d = start_daemon()
    with ThreadPoolExecutor(4) as pool:
        human, as_json, broken, missing = pool.map(
            lambda args: ctl(bus, tree, *args),
            [
                ["show", "50-gpu.json"],
                ["show", "50-gpu.json", "--json"],
                ["--json", "show", "70-nobinary.json"],
                ["show", "nosuch.json"],
            ],
        )
    lines = ok(human).splitlines()
    fields = dict(line.split(":", 1) for line in lines)
    assert {k: v.strip() for k, v in fields.items()} == {
        "name": "50-gpu.json",
        "path": str(tree.dir("data") / "50-gpu.json"),
        "tier": "data",
        "type": "gpu",
        "description": "a gpu",
        "binary": bins["gpu"],
        "tags": "fast",
        "features": "virgl, render-node",
    }
    # Values are aligned in one column.
    assert len({line.index(v.strip()) for line, v in zip(lines, fields.values(), strict=True)}) == 1
    shown = json.loads(ok(as_json))
    assert set(shown) == DICT_KEYS and shown["features"] == ["virgl", "render-node"]
    assert shown == as_json_shape(daemon_view(bus)[0])
    b = json.loads(ok(broken))
    assert set(b) == DICT_KEYS and b["features"] is None and "/nonexistent/gpu" in b["probe_error"]
    line = failed(missing)
    assert "nosuch.json" in line and "no such descriptor" in line, line
    d.assert_clean_log()


def test_resolve(bus: PrivateBus, tree: Tree, start_daemon: StartDaemon) -> None:
    setup(tree)
    d = start_daemon()
    view = daemon_view(bus)
    with ThreadPoolExecutor(4) as pool:
        name, as_json, feature, no_feature, no_type = pool.map(
            lambda args: ctl(bus, tree, *args),
            [
                ["resolve", "input"],
                ["--json", "resolve", "gpu"],
                ["resolve", "gpu", "-f", "virgl"],
                ["resolve", "gpu", "--feature", "virgl", "--feature", "nosuch"],
                ["resolve", "nosuch"],
            ],
        )
    assert ok(name) == "60-input.json\n"
    assert json.loads(ok(as_json)) == as_json_shape(view[0])
    assert ok(feature) == "50-gpu.json\n"
    line = failed(no_feature)
    assert "50-gpu.json: feature missing: nosuch" in line, line
    assert "70-nobinary.json: probe failed" in line, line
    line = failed(no_type)
    assert "nosuch: unknown backend type; the types are " in line, line
    assert "'nosuch'" in line and "3 descriptor(s) of other types" in line, line
    d.assert_clean_log()


def test_capabilities(bus: PrivateBus, tree: Tree, start_daemon: StartDaemon) -> None:
    setup(tree)
    d = start_daemon()
    with ThreadPoolExecutor(4) as pool:
        pretty, compact, broken, missing = pool.map(
            lambda args: ctl(bus, tree, *args),
            [
                ["capabilities", "50-gpu.json"],
                ["--json", "capabilities", "50-gpu.json"],
                ["capabilities", "70-nobinary.json"],
                ["capabilities", "nosuch.json"],
            ],
        )
    caps = {"type": "gpu", "features": ["virgl", "render-node"]}
    assert json.loads(ok(pretty)) == caps and len(ok(pretty).splitlines()) > 1
    assert ok(compact) == ok(pretty)  # indented like every other --json output
    line = failed(broken)
    assert "70-nobinary.json" in line and "/nonexistent/gpu" in line, line
    line = failed(missing)
    assert "nosuch.json" in line, line
    d.assert_clean_log()


def test_monitor_json_streams_one_object_per_line(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    tree.write("data", "50-gpu.json", descriptor("gpu"))
    d = start_daemon()
    lines: queue.Queue[str] = queue.Queue()

    async def main() -> None:
        watcher = await MatchWatcher.open(bus.address)
        async with await listen(bus.address) as L:
            # Popen does not wait for the child, and a thread reads its output: the loop goes on.
            cmd = [VHOSTUSERCTL, "--address", bus.address, "monitor", "--json"]
            proc = subprocess.Popen(
                cmd,
                env=tree.env(),  # noqa: ASYNC220
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            reader = threading.Thread(
                target=lambda: [lines.put(x) for x in proc.stdout or ()], daemon=True
            )
            reader.start()
            try:
                # Wait until the monitor listens on the manager path, for index and object events.
                await watcher.wait_rules(
                    f"path='{MANAGER_PATH}',interface='org.vhostuserd.Broker1.Manager'",
                    f"path='{MANAGER_PATH}',interface='org.freedesktop.DBus.ObjectManager'",
                    exclude=[L.bus.unique_name or ""],
                )
                g0 = await L.generation()
                got: list[dict[str, Any]] = []

                def read_until(n: int) -> bool:
                    while len(got) < n:
                        try:
                            line = lines.get_nowait()
                        except queue.Empty:
                            return False
                        obj = json.loads(line)
                        assert isinstance(obj, dict), line
                        assert line.endswith("\n") and "\n" not in line[:-1], line
                        got.append(obj)
                    return True

                path = tree.write("sysconf", "40-new.json", descriptor("input", description="new"))
                await await_for(lambda: read_until(2), lambda: f"two lines; have {got}")
                obj = descriptor_path("40-new.json")
                added = next(e for e in got if e["event"] == "descriptor-added")
                assert added == {
                    **NO_EVENT,
                    "event": "descriptor-added",
                    "object": obj,
                    "name": "40-new.json",
                    "descriptor": {
                        "name": "40-new.json",
                        "path": str(path),
                        "tier": "sysconf",
                        "type": "input",
                        "description": "new",
                        "binary": "/usr/bin/true",
                        "tags": [],
                        "object": obj,
                        "probed": False,
                        "features": None,
                        "probe_error": None,
                    },
                }
                assert {**NO_EVENT, "event": "index-changed", "generation": g0 + 1} in got
                path.unlink()
                await await_for(lambda: read_until(4), lambda: f"four lines; have {got}")
                assert sorted(got[2:], key=lambda e: e["event"]) == [
                    {
                        **NO_EVENT,
                        "event": "descriptor-removed",
                        "object": obj,
                        "name": "40-new.json",
                    },
                    {**NO_EVENT, "event": "index-changed", "generation": g0 + 2},
                ]
                await L.settle(tree.dir("sysconf"))
                await L.generation()
            finally:
                proc.send_signal(signal.SIGINT)
                try:
                    rc = proc.wait(10)
                except subprocess.TimeoutExpired:  # keep the test's own failure, if any, visible
                    proc.kill()
                    rc = proc.wait()
                stderr = proc.stderr.read() if proc.stderr else ""
                reader.join(5)
                await watcher.close()
            assert rc == 130, (rc, stderr, got)
            assert "Traceback" not in stderr, stderr
            # Nothing else was printed: the barrier changed no index and no object.
            assert lines.empty(), list(lines.queue)

    run(main())
    d.assert_clean_log()


def test_without_a_daemon_the_cli_says_try_offline(tree: Tree) -> None:
    tree.write("sysconf", "50-gpu.json", descriptor("gpu"))
    empty = PrivateBus()  # its own bus: no daemon, no service file to activate one
    try:
        nowhere = f"unix:path={tree.root / 'no-such-bus.sock'}"
        commands = [
            ["list"],
            ["show", "50-gpu.json"],
            ["resolve", "gpu"],
            ["capabilities", "50-gpu.json"],
            ["--json", "list"],
        ]
        runs = [(address, args) for address in (empty.address, nowhere) for args in commands]
        with ThreadPoolExecutor(4) as pool:
            results = list(
                pool.map(
                    lambda a: subprocess.run(
                        [VHOSTUSERCTL, "--address", a[0], *a[1]],
                        env=tree.env(),
                        capture_output=True,
                        text=True,
                        timeout=30,
                        check=False,
                    ),
                    runs,
                )
            )
            monitor = subprocess.run(
                [VHOSTUSERCTL, "--address", empty.address, "monitor"],
                env=tree.env(),
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        for (address, args), r in zip(runs, results, strict=True):
            if "--json" in args:  # the error as a JSON object (docs/json.md)
                assert r.returncode == 1 and r.stdout == "", r
                error = json.loads(r.stderr)
                assert error["error"].startswith("org.freedesktop.DBus.Error.")
                line = error["message"]
            else:
                line = failed(r)
            assert "--offline" in line, (address, args, line)
            assert "Traceback" not in r.stderr
        first = failed(results[0])
        assert "not running" in first and "could not be activated" in first, first
        failed(monitor)
        assert not empty.name_has_owner()
    finally:
        empty.close()
    # And the advice works.
    r = ctl(None, tree, "list", "--offline", "--sysconfdir", str(tree.sysconfdir), "--json")
    assert [i["name"] for i in json.loads(ok(r))] == ["50-gpu.json"]


# ------------------------------------------------------------ status, reload, stop, monitor lines


def test_status_and_reload_for_admins(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    setup(tree)
    broken = tree.write("user", "80-broken.json", b"{")
    d = start_daemon()
    view = daemon_view(bus)
    assert view
    text = ok(ctl(bus, tree, "status"))
    lines = text.splitlines()
    assert lines[0].startswith(f"vhostuserd {__version__} on bus {bus.address}"), text
    gen = int(next(x for x in lines if x.startswith("index generation: ")).split(": ")[1])
    assert f"  {tree.dir('user')}" in lines and f"  {tree.dir('data', 1)}" in lines, text
    assert "diagnostics: 1 (vhostuserctl check lists them with their files)" in lines, text
    assert any(x.startswith(f"  {broken}: error: ") for x in lines), text
    assert lines[-1] == "backends: 0 running", text
    reloaded = re.fullmatch(r"reloaded: index generation (\d+)\n", ok(ctl(bus, tree, "reload")))
    assert reloaded and int(reloaded.group(1)) >= gen
    assert json.loads(ok(ctl(bus, tree, "--json", "reload")))["generation"] >= int(
        reloaded.group(1)
    )
    status = json.loads(ok(ctl(bus, tree, "--json", "status")))
    assert (
        status["version"] == __version__
        and status["bus"] == bus.address
        and status["mode"] == "unknown"
    )
    assert status["search_path"][0] == str(tree.dir("user"))
    d.assert_clean_log()


def test_stop_says_how_the_backend_ended_and_that_it_waits_for_the_grace_period(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    stubborn = install(tree, "ignores_sigterm", "fs", short="stubborn")
    start_daemon("--grace-period", "3")
    try:
        r = ctl(
            bus, tree, "spawn", stubborn.name, "--listen", str(tree.root / "s.sock"), "--detach"
        )
        backend_id = ok(r).strip()
        stubborn.report(
            int(json.loads(ok(ctl(bus, tree, "--json", "backends")))[0]["pid"])
        )  # it runs
        r = ctl(bus, tree, "stop", backend_id)
        assert r.returncode == 0, r.stderr
        assert r.stderr.startswith(f"backend {backend_id}: sent SIGTERM to pid "), r.stderr
        assert "waiting for it to exit (SIGKILL after the daemon's grace period)" in r.stderr, (
            r.stderr
        )
        assert (
            r.stdout
            == f"backend {backend_id} ({stubborn.name}) stopped: killed by signal 9 (SIGKILL)\n"
        )
    finally:
        kill_marked(tree)


def test_empty_results_say_so_and_the_table_explains_its_marks(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    start_daemon()
    assert ok(ctl(bus, tree, "list")) == "no descriptors\n"
    assert ok(ctl(bus, tree, "backends")) == "no backends\n"
    tree.write("data", "50-gpu.json", descriptor("gpu"))
    text = wait_for(
        lambda: (out := ok(ctl(bus, tree, "list"))) != "no descriptors\n" and out,
        "the new descriptor",
    )
    table, footnote = text.rstrip("\n").split("\n\n")
    assert table.splitlines()[1].split()[-1] in (
        "-",
        "failed",
    )  # /usr/bin/true: not probed, or failed
    assert (
        footnote.startswith("FEATURES: - not probed yet")
        and "(none) probed: no features" in footnote
    )


def test_monitor_prints_backend_events_like_descriptor_events(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    fs = install(tree, "honours_sigterm", "fs", short="fs")
    start_daemon()
    lines: queue.Queue[str] = queue.Queue()
    proc = subprocess.Popen(
        [VHOSTUSERCTL, "--address", bus.address, "monitor"],
        env=tree.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout or ()], daemon=True).start()
    got: list[str] = []

    def drain() -> list[str]:
        while not lines.empty():
            got.append(lines.get_nowait().rstrip("\n"))
        return got

    try:
        wait_for(
            lambda: any(x.startswith("monitoring vhostuserd") for x in drain()),
            "the monitor's banner",
        )
        n = 0

        def seen_new() -> bool:  # the banner comes before the subscription: retry until it sees one
            nonlocal n
            n += 1
            tree.write("sysconf", f"40-new-{n}.json", descriptor("input"))
            return any(x.startswith("descriptor added: 40-new-") for x in drain())

        wait_for(seen_new, lambda: f"a descriptor-added line; have {got}")
        backend_id = ok(
            ctl(bus, tree, "spawn", fs.name, "--listen", str(tree.root / "m.sock"), "--detach")
        ).strip()
        ok(ctl(bus, tree, "stop", backend_id))
        wait_for(
            lambda: f"backend removed: {backend_id}" in drain(),
            lambda: f"the backend's lines; have {got}",
        )
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
    added = next(x for x in got if x.startswith("descriptor added: 40-new-"))
    assert re.fullmatch(r"descriptor added: 40-new-\d+\.json \(input, sysconf, /.*\)", added), added
    backend = [x for x in got if x.startswith("backend ")]
    assert re.fullmatch(
        rf"backend added: {backend_id} \({re.escape(fs.name)}, pid \d+, running, detached\)",
        backend[0],
    ), backend
    assert (
        f"backend stopping: {backend_id}" in backend
        and f"backend exited: {backend_id}" not in backend
    )
    assert (
        f"backend exited: {backend_id} (killed by signal 15 (SIGTERM))" in backend
        or f"backend exited: {backend_id} (exited with status 0)" in backend
    ), backend
    assert backend[-1] == f"backend removed: {backend_id}", backend
