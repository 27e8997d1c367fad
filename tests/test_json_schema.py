"""Every ``--json`` output of every ``vhostuserctl`` command validates against the schema
shipped in the repository (docs/vhostuserctl.schema.json, explained in docs/json.md), errors
included, against the real daemon on a private bus with fake backends (issue 11, point 10).

The schema forbids unknown keys and requires every key: one shape per object, the same
keys whatever the state, null when unknown.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from busutil import VHOSTUSERCTL, Daemon, PrivateBus, Tree, ctl, descriptor, fake_backend, wait_for
from helpers_spawn import install, kill_marked

REPO = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((REPO / "docs" / "vhostuserctl.schema.json").read_text())
StartDaemon = Callable[..., Daemon]


def validate(command: str, value: Any) -> None:
    schema = {
        "$schema": SCHEMA["$schema"],
        "$defs": SCHEMA["$defs"],
        "$ref": f"#/$defs/command/{command}",
    }
    jsonschema.Draft202012Validator(schema).validate(value)


def out(r: subprocess.CompletedProcess[str], command: str) -> Any:
    assert r.returncode == 0, (r.args, r.stdout, r.stderr)
    value = json.loads(r.stdout)
    validate(command, value)
    return value


def err(r: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert r.returncode == 1 and r.stdout == "", (r.args, r.returncode, r.stdout, r.stderr)
    value: dict[str, Any] = json.loads(r.stderr)
    validate("error", value)
    return value


@pytest.fixture(autouse=True)
def no_backend_left(tree: Tree) -> Iterator[None]:
    yield
    kill_marked(tree)


def test_the_schema_is_itself_valid() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    for name in SCHEMA["$defs"]["command"]:
        jsonschema.Draft202012Validator.check_schema(SCHEMA["$defs"]["command"][name])


def test_the_schema_rejects_a_missing_or_an_unknown_key() -> None:
    d = {
        "name": "50-a.json",
        "path": "/a/50-a.json",
        "tier": "data",
        "type": "gpu",
        "description": "",
        "binary": "/usr/bin/true",
        "tags": [],
        "object": None,
        "probed": False,
        "features": None,
        "probe_error": None,
    }
    validate("show", d)
    for bad in (
        {k: v for k, v in d.items() if k != "features"},
        {**d, "Name": "x"},
        {**d, "tier": "home"},
    ):
        with pytest.raises(jsonschema.ValidationError):
            validate("show", bad)


def test_every_query_command_json_validates_online_and_offline(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    gpu = fake_backend(tree.root / "gpu-backend", "gpu", ["virgl"])
    tree.write("data", "50-gpu.json", descriptor("gpu", gpu, "a gpu"))
    tree.write("data", "60-gone.json", descriptor("gpu", "/nonexistent/gpu"))
    tree.write("sysconf", "70-input.json", descriptor("input"))
    tree.write("user", "80-broken.json", b"{")
    start_daemon()
    offline = ["--offline", "--sysconfdir", str(tree.sysconfdir)]
    for where in ([], offline):
        b = None if where else bus
        items = out(ctl(b, tree, "--json", "list", *where), "list")
        assert [i["name"] for i in items] == ["50-gpu.json", "60-gone.json", "70-input.json"]
        out(ctl(b, tree, "--json", "list", "--type", "nosuch", *where), "list")
        shown = out(ctl(b, tree, "--json", "show", "50-gpu.json", *where), "show")
        assert shown["features"] == ["virgl"] and shown["probed"] is True
        gone = out(ctl(b, tree, "--json", "show", "60-gone.json", *where), "show")
        assert gone["features"] is None and gone["probe_error"]
        out(ctl(b, tree, "--json", "resolve", "gpu", "-f", "virgl", *where), "resolve")
        out(ctl(b, tree, "--json", "resolve", "input", *where), "resolve")
        out(ctl(b, tree, "--json", "capabilities", "50-gpu.json", *where), "capabilities")
        for args in (
            ["show", "nosuch.json"],
            ["show", "80-broken.json"],
            ["resolve", "gpu", "-f", "nosuch"],
            ["resolve", "nonsense"],
            ["capabilities", "60-gone.json"],
        ):
            e = err(ctl(b, tree, "--json", *args, *where))
            assert e["error"].startswith("org.vhostuserd.Broker1.Error."), e
    status = out(ctl(bus, tree, "--json", "status"), "status")
    assert status["generation"] >= 1 and status["backends"] == 0
    assert any(d["path"].endswith("80-broken.json") for d in status["diagnostics"])
    out(ctl(bus, tree, "--json", "reload"), "reload")
    for probe in ([], ["--probe"]):
        r = ctl(None, tree, "--json", "check", *probe, "--sysconfdir", str(tree.sysconfdir))
        assert r.returncode == 1, r.stderr  # 80-broken.json: the report says so, as JSON
        report = json.loads(r.stdout)
        validate("check", report)
        assert report["ok"] is False
    e = err(ctl(None, tree, "--json", "--address", f"unix:path={tree.root}/none.sock", "list"))
    assert e["error"].startswith("org.freedesktop.DBus.Error."), e


def test_every_backend_command_json_validates(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    fs = install(tree, "honours_sigterm", "fs", short="fs")
    gpu = install(tree, "chatty", "gpu", short="chatty", lines=2)
    start_daemon()
    sock = tree.root / "fs.sock"
    spawned = out(
        ctl(bus, tree, "--json", "spawn", fs.name, "--listen", str(sock), "--detach"), "spawn"
    )
    assert (
        spawned["state"] == "running"
        and spawned["exit_status"] is None
        and spawned["detached"] is True
    )
    listed = out(ctl(bus, tree, "--json", "backends"), "backends")
    assert [b["id"] for b in listed] == [spawned["id"]]
    log = out(ctl(bus, tree, "--json", "log", spawned["id"]), "log")
    assert log["id"] == spawned["id"]
    stopped = out(ctl(bus, tree, "--json", "stop", spawned["id"]), "stop")
    assert stopped["id"] == spawned["id"] and stopped["state"] == "exited"
    r = ctl(bus, tree, "--json", "spawn", gpu.name, "--exec", "--", sys.executable, "-c", "pass")
    assert r.returncode == 0, r.stderr
    validate("spawn", json.loads(r.stdout))
    for args in (
        ["stop", "999"],
        ["log", "999"],
        ["spawn", fs.name, "--listen", str(tree.root), "--detach"],
        ["spawn", "nosuch.json", "--exec", "--", "true"],
    ):
        e = err(ctl(bus, tree, "--json", *args))
        assert e["error"].startswith("org.vhostuserd.Broker1.Error."), e


def test_monitor_json_lines_validate_for_every_kind_of_event(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    fs = install(tree, "honours_sigterm", "fs", short="fs")
    start_daemon()
    lines: queue.Queue[str] = queue.Queue()
    proc = subprocess.Popen(
        [VHOSTUSERCTL, "--address", bus.address, "--json", "monitor"],
        env=tree.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout or ()], daemon=True).start()
    seen: dict[str, dict[str, Any]] = {}

    def drain() -> set[str]:
        while True:
            try:
                line = lines.get_nowait()
            except queue.Empty:
                return set(seen)
            event = json.loads(line)
            validate("monitor", event)
            seen.setdefault(event["event"], event)

    try:
        # The monitor is subscribed once a change it makes shows up: retry the change until then.
        probe = 0

        def index_event_seen() -> bool:
            nonlocal probe
            probe += 1
            tree.write("sysconf", f"40-new-{probe}.json", descriptor("input"))
            return "descriptor-added" in drain()

        wait_for(
            index_event_seen, lambda: f"the monitor to see a new descriptor; saw {sorted(seen)}"
        )
        for p in tree.dir("sysconf").glob("40-new-*.json"):
            p.unlink()
        spawned = json.loads(
            ctl(
                bus,
                tree,
                "--json",
                "spawn",
                fs.name,
                "--listen",
                str(tree.root / "m.sock"),
                "--detach",
            ).stdout
        )
        assert ctl(bus, tree, "stop", spawned["id"]).returncode == 0
        want = {
            "index-changed",
            "descriptor-added",
            "descriptor-removed",
            "backend-added",
            "backend-changed",
            "backend-exited",
            "backend-removed",
        }
        wait_for(
            lambda: want <= drain(), lambda: f"every kind of event; saw {sorted(seen)}", timeout=20
        )
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
    assert seen["backend-added"]["backend"]["id"] == spawned["id"]
    assert seen["backend-exited"]["state"] == "exited"
    assert seen["descriptor-added"]["descriptor"]["tier"] == "sysconf"
