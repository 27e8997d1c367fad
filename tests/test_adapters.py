"""Adapter descriptors (issue 15 item 1): backends that do not follow the conventions.

Parsing, the placeholders and what they refuse are pure (`vhostuserd.adapters`, reached
through `descriptors.parse_descriptor` and `options.plan`) and tested table by table without
a bus. The bus tests prove the wiring: a rust-vmm style fake (tests/fake_backends/
socket_path.py, ``--socket-path`` only, no ``--print-capabilities``) is spawned from its
adapter with its static capabilities and never probed; `vhostuserctl check` validates
adapters. An adapter in the user tier is a broken file (parse_descriptor's rule, below): the
daemon serves such a file's diagnostic and refuses its name as it does any broken file's.
The real backend, qemu-storage-daemon, in a real guest: tests/test_guest_blk_adapter.py.
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from busutil import VHOSTUSERCTL, Daemon, PrivateBus, Tree, run
from helpers_spawn import Client, install, kill_marked, listening

from vhostuserd.core import adapters
from vhostuserd.core.descriptors import parse_descriptor
from vhostuserd.core.options import plan
from vhostuserd.core.optiontable import OptionError

REPO = Path(__file__).resolve().parent.parent
QSD_EXAMPLE = REPO / "examples" / "adapters" / "50-qemu-storage-daemon-blk.json"
StartDaemon = Callable[..., Daemon]


def parse(doc: dict[str, Any], tier: str = "data") -> Any:
    return parse_descriptor(
        json.dumps(doc).encode(), path="/d/50-a.json", name="50-a.json", tier=tier
    )


def adapter_doc(adapter: Any, btype: str = "block") -> dict[str, Any]:
    return {"description": "x", "type": btype, "binary": "/usr/bin/x", adapters.KEY: adapter}


def argv_of(doc: dict[str, Any], options: dict[str, tuple[str, Any]]) -> list[str]:
    d = parse(doc).descriptor
    assert d is not None
    return list(plan(d, d.static_capabilities, options).argv)


QSD = json.loads(QSD_EXAMPLE.read_text())
ROOT = "/x-vhostuserd-adapter"


# ---------------------------------------------------------------- parsing (pure)


@pytest.mark.parametrize(
    ("adapter", "btype", "wanted"),
    [
        ([], "block", f"{ROOT}: must be a JSON object"),
        ({}, "block", f"{ROOT}: missing required key 'argv'"),
        ({"argv": [], "probe": True}, "block", f"{ROOT}/probe: unknown key"),
        (
            {"argv": ["--x"]},
            "block",
            f"{ROOT}/argv: must pass the socket, with {{fd}} or {{fd-path}}",
        ),
        ({"argv": "--fd={fd}"}, "block", f"{ROOT}/argv: must be a list of strings"),
        ({"argv": [3]}, "block", f"{ROOT}/argv/0: must be a string"),
        ({"argv": ["--fd={fd}", ""]}, "block", f"{ROOT}/argv/1: an argument is 1 to"),
        ({"argv": ["--fd={fd}\n"]}, "block", f"{ROOT}/argv/0: an argument is 1 to"),
        ({"argv": ["--fd={fd"]}, "block", f"{ROOT}/argv/0: a lone '{{'"),
        ({"argv": ["--fd={sock}"]}, "block", f"{ROOT}/argv/0: unknown placeholder {{sock}}"),
        ({"argv": ["{fd}", "{detach?a:b}"]}, "block", "unknown placeholder {detach}"),
        ({"argv": ["{fd}", "{blk-file}"]}, "block", "{blk-file} needs 'blk-file' in features"),
        (
            {"argv": ["{fd}", "{virgl?on:off}"], "features": ["virgl"]},
            "block",
            "{virgl} is an option of gpu backends, not block",
        ),
        (
            {"argv": ["{fd}", "{read-only}"], "features": ["read-only"]},
            "block",
            "option 'read-only' has type 'b': write {read-only?IF-TRUE:IF-FALSE}",
        ),
        (
            {"argv": ["{fd}", "{blk-file?a:b}"], "features": ["blk-file"]},
            "block",
            "option 'blk-file' has type 's': write {blk-file}",
        ),
        ({"argv": ["{fd?a:b}"]}, "block", "{fd} takes no ?TRUE:FALSE"),
        (
            {"argv": ["{fd}"], "features": ["read-only"]},
            "block",
            f"{ROOT}/features: 'read-only' is listed but no argument uses it",
        ),
        (
            {"argv": ["{fd}"], "features": [""]},
            "block",
            f"{ROOT}/features: must be a list of non-empty",
        ),
        (
            {"argv": ["{fd}"], "options": {"shared-dir": ["{shared-dir}"]}},
            "block",
            f"{ROOT}/options/shared-dir: not an option of block backends",
        ),
        (
            {"argv": ["{fd}"], "options": {"read-only": ["--ro"]}},
            "block",
            f"{ROOT}/options/read-only: needs 'read-only' in features",
        ),
        (
            {"argv": ["{fd}"], "socket": "both"},
            "block",
            f"{ROOT}/socket: must be 'connected' or 'listening'",
        ),
        ({"argv": ["{fd}"]}, "rng", f"{ROOT}/socket: required for type 'rng'"),
    ],
)
def test_a_broken_adapter_is_a_broken_file_whose_diagnostic_names_the_key(
    adapter: Any, btype: str, wanted: str
) -> None:
    p = parse(adapter_doc(adapter, btype))
    assert p.broken, p
    (diag,) = p.diagnostics
    assert wanted in diag.message, diag.message


@pytest.mark.parametrize("tier", ["user"])
def test_an_adapter_outside_the_data_and_sysconf_tiers_is_refused(tier: str) -> None:
    p = parse(QSD, tier)
    assert p.broken
    assert "an adapter is trusted only from the data and sysconf tiers, not the user tier" in (
        p.diagnostics[0].message
    )
    for trusted in ("data", "sysconf"):
        assert parse(QSD, trusted).descriptor is not None


def test_an_adapters_capabilities_are_static() -> None:
    d = parse(QSD).descriptor
    caps = d.static_capabilities
    assert (caps.type, caps.features) == ("block", ("blk-file", "read-only"))
    assert json.loads(caps.json) == {"type": "block", "features": ["blk-file", "read-only"]}
    plain = parse({"description": "x", "type": "block", "binary": "/usr/bin/x"}).descriptor
    assert plain.static_capabilities is None and plain.adapter is None


# ---------------------------------------------------------------- argv (pure)


def test_qemu_storage_daemon_adapter_builds_its_blockdev_and_export() -> None:
    head = ["/usr/bin/qemu-storage-daemon", "--blockdev"]
    export = "type=vhost-user-blk,id=export0,node-name=file0,addr.type=fd,addr.str=3,writable="
    assert argv_of(QSD, {"blk-file": ("s", "/home/u/disk.img")}) == [
        *head,
        "driver=file,node-name=file0,filename=/home/u/disk.img,read-only=off",
        "--export",
        export + "on",
    ]
    assert argv_of(QSD, {"blk-file": ("s", "/d.img"), "read-only": ("b", True)}) == [
        *head,
        "driver=file,node-name=file0,filename=/d.img,read-only=on",
        "--export",
        export + "off",
    ]


RUST_VMM = adapter_doc(
    {
        "socket": "listening",
        "features": ["render-node", "virgl"],
        "argv": ["--socket-path={fd-path}", "--socket-count", "1", "{{literal}}"],
        "options": {"render-node": ["--render-node", "{render-node}"], "virgl": ["--virgl"]},
    },
    "gpu",
)


@pytest.mark.parametrize(
    ("options", "tail"),
    [
        ({}, []),
        ({"virgl": ("b", True)}, ["--virgl"]),
        ({"virgl": ("b", False)}, []),
        (
            {"render-node": ("s", "/dev/dri/renderD128"), "virgl": ("b", True)},
            ["--render-node", "/dev/dri/renderD128", "--virgl"],
        ),
    ],
)
def test_options_add_the_arguments_the_adapter_maps_them_to(
    options: dict[str, tuple[str, Any]], tail: list[str]
) -> None:
    base = ["/usr/bin/x", "--socket-path=/proc/self/fd/3", "--socket-count", "1", "{literal}"]
    assert argv_of(RUST_VMM, options) == base + tail


@pytest.mark.parametrize(
    ("doc", "options", "wanted"),
    [
        (QSD, {"blk-file": ("s", "/a,driver=null-co")}, "option 'blk-file': must not contain ','"),
        (
            QSD,
            {"blk-file": ("s", "/a\nb")},
            "option 'blk-file': must not contain NUL or line breaks",
        ),
        (
            QSD,
            {"blk-file": ("s", "/a\0b")},
            "option 'blk-file': must not contain NUL or line breaks",
        ),
        (QSD, {"blk-file": ("s", "-o")}, "option 'blk-file': must be an absolute path"),
        (QSD, {}, "option 'blk-file': required by the adapter of 50-a.json"),
        (
            QSD,
            {"blk-file": ("s", "/d.img"), "shared-dir": ("s", "/s")},
            "option 'shared-dir': only for fs",
        ),
        (
            QSD,
            {"blk-file": ("s", "/d.img"), "turbo": ("b", True)},
            "option 'turbo': unknown option",
        ),
        (
            adapter_doc({"argv": ["{fd}"]}),
            {"blk-file": ("s", "/d.img")},
            "option 'blk-file': 50-a.json does not list the 'blk-file' feature",
        ),
        (
            adapter_doc(
                {
                    "argv": ["{fd}", "--x={blk-file}"],
                    "features": ["blk-file", "read-only"],
                    "options": {"read-only": ["--ro"]},
                }
            ),
            {"blk-file": ("s", "-x")},
            "option 'blk-file': must be an absolute path",
        ),
    ],
)
def test_placeholders_refuse_what_would_become_a_free_argument(
    doc: dict[str, Any], options: dict[str, tuple[str, Any]], wanted: str
) -> None:
    with pytest.raises(OptionError) as e:
        argv_of(doc, options)
    assert e.value.kind == "InvalidOption" and wanted in str(e.value), str(e.value)


@pytest.mark.parametrize(
    ("value", "wanted"),
    [
        ("-rf", "option 'shared-dir': must not start with '-'"),
        ("a\nb", "option 'shared-dir': must not contain NUL or line breaks"),
        ("a\0b", "option 'shared-dir': must not contain NUL or line breaks"),
        ("a,b", "option 'shared-dir': must not contain ','"),
    ],
)
def test_a_placeholder_value_is_checked_whatever_the_option_checked_before(
    value: str, wanted: str
) -> None:
    """The adapter's own rules, on a value no option check saw (defence in depth)."""
    a = adapters.parse({"argv": ["{fd}", "-o", "source={shared-dir},cache=auto"]}, "fs", "data")
    with pytest.raises(OptionError, match=wanted):
        adapters.argv(a, "/usr/bin/x", "50-a.json", {"shared-dir": value})


# ---------------------------------------------------------------- the wiring (bus)


@pytest.fixture
def rust_vmm_fake(tree: Tree) -> Any:
    fake = install(tree, "socket_path", "rng", None, short="rng", write_descriptor=False)
    doc = {
        "description": "vhost-device-rng style",
        "type": "rng",
        "binary": str(fake.path),
        adapters.KEY: {"socket": "listening", "argv": ["--socket-path={fd-path}"]},
    }
    tree.write("data", fake.name, doc)
    yield fake
    kill_marked(tree)


def test_a_socket_path_backend_runs_from_its_adapter_on_the_callers_socket_unprobed(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon, rust_vmm_fake: Any
) -> None:
    fake = rust_vmm_fake
    start_daemon()

    async def main() -> None:
        c = await Client.open(bus.address)
        (info,) = [d for d in await c.list_descriptors() if d.name == fake.name]
        assert info.features == () and not info.probe_error, info
        listener = listening(tree.root / "rng.sock")
        try:
            path = await c.spawn(fake.name, listener.fileno(), {"settle-ms": 0})
        finally:
            listener.close()
        props = await c.backend(path)
        assert props["Argv"] == [str(fake.path), "--socket-path=/proc/self/fd/3"]
        front = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        front.settimeout(10)
        front.connect(str(tree.root / "rng.sock"))
        assert front.recv(100) == f"hello from backend {props['Pid']}\n".encode()
        front.close()
        report = fake.report(props["Pid"])
        assert report["got"] == {"paths": ["/proc/self/fd/3"], "listening": True, "accepted": True}
        # A connected socket is refused: the adapter says it listens.
        ours, theirs = socket.socketpair()
        try:
            reply = await c.raw_spawn(fake.name, {}, [theirs.fileno()])
        finally:
            ours.close()
            theirs.close()
        assert reply.error_name == "org.vhostuserd.Broker1.Error.InvalidSocket", reply.body
        await c.stop(path)
        await c.close()

    run(main())
    assert not (fake.report_dir / "probed").exists(), "an adapter's backend is never probed"


def test_vhostuserctl_check_validates_adapters(tmp_path: Path) -> None:
    good = tmp_path / "50-good.json"
    good.write_text(QSD_EXAMPLE.read_text())
    bad = tmp_path / "50-bad.json"
    bad.write_text(
        json.dumps(adapter_doc({"argv": ["--blk={blk-file}"], "features": ["blk-file"]}))
    )
    ok = subprocess.run(
        [VHOSTUSERCTL, "check", str(good)], capture_output=True, text=True, check=False
    )
    assert ok.returncode == 0, ok
    r = subprocess.run(
        [VHOSTUSERCTL, "check", "--json", str(bad)], capture_output=True, text=True, check=False
    )
    assert r.returncode != 0, r
    assert f"{ROOT}/argv: must pass the socket" in r.stdout, r.stdout


def test_the_readmes_adapter_examples_are_valid_adapters() -> None:
    readme = (REPO / "README.md").read_text()
    blocks = [b for b in readme.split("```json\n")[1:] if adapters.KEY in b.split("```", 1)[0]]
    docs = []
    decoder = json.JSONDecoder()
    for block in blocks:
        text = block.split("```", 1)[0].strip()
        while text:
            doc, end = decoder.raw_decode(text)
            docs.append(doc)
            text = text[end:].strip()
    assert len(docs) == 4, docs
    for doc in docs:
        p = parse(doc)
        assert p.descriptor is not None and p.descriptor.adapter is not None, p.diagnostics
    assert docs[0][adapters.KEY] == QSD[adapters.KEY], "the README shows the example as shipped"
