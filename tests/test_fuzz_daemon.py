"""Fuzzing the running system service, and the lookup core under it.

One real vhostuserd (--system, polkit = python-dbusmock's polkitd template denying
everything) takes a few hundred random calls from an unprivileged caller: Resolve with
random types and features, Spawn with random names, random option keys, random variant
types and values and an fd of a random kind (sockets of every type, pipes, /dev/null,
directories, O_PATH), and calls of random members on our objects with random arguments.
Only typed errors may come back, the daemon must stay up, and its open fds must be what
they were before the run (every received fd closed, on every path).

The lookup fuzz writes random bytes, random kinds of entries (FIFOs, loops, masks, huge
sparse files) and names that are not UTF-8 into real directories and runs scan + merge:
nothing raises, every file that does not become a descriptor is said why, and every string
the daemon's live index would send over D-Bus can be sent (names that are not UTF-8 are
reported instead of served).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from busutil import Tree, wait_for
from helpers_auth import (
    NOBODY,
    Caller,
    DbusmockPolkit,
    SystemSetup,
    descriptor_doc,
    setup,
    system_bus,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhostuserd.core import lookup
from vhostuserd.core.descriptors import ERROR, MAX_DESCRIPTOR_SIZE
from vhostuserd.core.index import Index
from vhostuserd.core.optiontable import OPTIONS
from vhostuserd.edges import scan
from vhostuserd.edges.watch import Feed

MIN_CASES = 250
ALLOWED_FREEDESKTOP = {
    "org.freedesktop.DBus.Error." + n
    for n in (
        "UnknownMethod",
        "UnknownInterface",
        "UnknownObject",
        "UnknownProperty",
        "InvalidArgs",
        "PropertyReadOnly",
        "AccessDenied",
        "InteractiveAuthorizationRequired",
        "NotSupported",
        "InvalidSignature",
    )
}
BROKER_ERRORS = "org.vhostuserd.Broker1.Error."
OUR_PATHS = [
    "/org/vhostuserd/Broker1",
    "/org/vhostuserd/Broker1/descriptor/_350_2dgpu_2ejson",
    "/org/vhostuserd/Broker1/backend/1",
    "/org/vhostuserd",
    "/",
]
OUR_INTERFACES = [
    "org.vhostuserd.Broker1.Manager",
    "org.vhostuserd.Broker1.Descriptor",
    "org.vhostuserd.Broker1.Backend",
    "org.freedesktop.DBus.Properties",
    "org.freedesktop.DBus.Introspectable",
    "org.freedesktop.DBus.ObjectManager",
    "org.freedesktop.DBus.Peer",
    "org.example.Nothing",
]
FD_KINDS = ["socketpair", "listen", "dgram", "seqpacket", "tcp", "pipe", "devnull", "opath", "dir"]
NAMES = [
    "50-gpu.json",
    "50-fs.json",
    "50-fs-o.json",
    "50-input.json",
    "/bin/sh",
    "../50-gpu.json",
    "",
]

# ---------------------------------------------------------------- strategies for D-Bus values

text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=24
)
paths_ish = st.sampled_from(
    [
        "/dev/null",
        "/dev/dri/../null",
        "/srv",
        "/srv,x",
        "/srv --x",
        "/" * 3,
        "/dev/dri/renderD128",
        "/dev/input/event0",
        "relative",
        "/tmp/\u00e9",
    ]
)
object_paths = st.sampled_from(["/", "/a", "/org/vhostuserd/Broker1", "/a/b_c/D9"])


def values_for(sig: str, depth: int = 0) -> st.SearchStrategy[Any]:
    """JSON for the caller process (see tests/agents/caller.py) that becomes a value of ``sig``."""
    simple: dict[str, st.SearchStrategy[Any]] = {
        "s": text | paths_ish,
        "b": st.booleans(),
        "y": st.integers(0, 255),
        "n": st.integers(-(2**15), 2**15 - 1),
        "q": st.integers(0, 2**16 - 1),
        "i": st.integers(-(2**31), 2**31 - 1),
        "u": st.integers(0, 2**32 - 1),
        "x": st.integers(-(2**63), 2**63 - 1),
        "t": st.integers(0, 2**64 - 1),
        "d": st.floats(allow_nan=False, allow_infinity=False),
        "o": object_paths,
        "g": st.sampled_from(["", "s", "a{sv}", "(ii)"]),
        "h": st.sampled_from(FD_KINDS).map(lambda k: {"$fd": k}),
        "as": st.lists(text, max_size=3),
        "ay": st.binary(max_size=8).map(lambda b: {"$bytes": b.hex()}),
        "a{ss}": st.dictionaries(text, text, max_size=3),
        "(si)": st.tuples(text, st.integers(-5, 5)).map(lambda t: {"$tuple": list(t)}),
        "ah": st.lists(st.sampled_from(FD_KINDS).map(lambda k: {"$fd": k}), max_size=2),
    }
    if sig == "v":
        if depth > 1:
            return variants(depth + 1, plain_only=True)
        return variants(depth + 1)
    if sig == "a{sv}":
        return st.dictionaries(
            text | st.sampled_from(list(OPTIONS)), variants(depth + 1), max_size=3
        )
    return simple[sig]


VARIANT_SIGS = [
    "s",
    "b",
    "y",
    "n",
    "q",
    "i",
    "u",
    "x",
    "t",
    "d",
    "o",
    "g",
    "h",
    "as",
    "ay",
    "a{ss}",
    "(si)",
    "v",
    "a{sv}",
]


def variants(depth: int = 0, plain_only: bool = False) -> st.SearchStrategy[Any]:
    sigs = [s for s in VARIANT_SIGS if not plain_only or s not in ("v", "a{sv}")]
    return st.sampled_from(sigs).flatmap(
        lambda sig: values_for(sig, depth).map(lambda v: {"$v": [sig, v]})
    )


def spawn_options() -> st.SearchStrategy[dict[str, Any]]:
    """Keys mostly real options, values mostly of the right type, sometimes not."""
    right = st.sampled_from(sorted(OPTIONS)).flatmap(
        lambda k: values_for(OPTIONS[k].signature).map(
            lambda v: (k, {"$v": [OPTIONS[k].signature, v]})
        )
    )
    wrong = st.tuples(st.sampled_from(sorted(OPTIONS)) | text, variants())
    return st.lists(right | wrong, max_size=5).map(dict)


@st.composite
def calls(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["resolve", "spawn", "spawn", "member", "manager-member"]))
    if kind == "resolve":
        btype = draw(st.sampled_from(["gpu", "fs", "input", "", "sound"]) | text)
        features = draw(
            st.lists(
                st.sampled_from(["virgl", "render-node", "separate-options"]) | text, max_size=4
            )
        )
        return {"member": "Resolve", "signature": "sas", "body": [btype, features]}
    if kind == "spawn":
        name = draw(st.sampled_from(NAMES[:4]) | st.sampled_from(NAMES) | text)
        # Mostly the kind of socket some backend takes, so that calls get past the socket check.
        fd = draw(st.sampled_from(["socketpair", "listen"]) | st.sampled_from(FD_KINDS))
        return {
            "member": "Spawn",
            "signature": "sa{sv}h",
            "body": [name, draw(spawn_options()), {"$fd": fd}],
            "interactive": draw(st.booleans()),
        }
    sig = draw(
        st.sampled_from(
            ["", "s", "ss", "sas", "sa{sv}h", "h", "ah", "u", "v", "a{sv}", "(si)", "as"]
        )
    )
    body = []
    for part in _split(sig):
        body.append(draw(values_for(part)))
    member = draw(
        st.sampled_from(
            [
                "Spawn",
                "Resolve",
                "Stop",
                "GetLog",
                "Reload",
                "Get",
                "Set",
                "GetAll",
                "ListDescriptors",
                "ListBackends",
                "GetCapabilities",
                "Introspect",
                "GetManagedObjects",
                "Ping",
            ]
        )
        | st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_]{0,30}\Z")
    )
    if kind == "manager-member":
        return {"member": member, "signature": sig, "body": body}
    return {
        "member": member,
        "signature": sig,
        "body": body,
        "path": draw(st.sampled_from(OUR_PATHS)),
        "interface": draw(st.sampled_from(OUR_INTERFACES)),
    }


def _split(sig: str) -> list[str]:
    """Complete types of a signature made only of the types values_for knows."""
    out, i = [], 0
    while i < len(sig):
        for t in ("a{sv}", "a{ss}", "(si)", "as", "ay", "ah"):
            if sig.startswith(t, i):
                out.append(t)
                i += len(t)
                break
        else:
            out.append(sig[i])
            i += 1
    return out


# ---------------------------------------------------------------- the daemon under fuzz


@pytest.fixture(scope="module")
def fuzz_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SystemSetup]:
    bus = system_bus()
    try:
        try:
            polkit = DbusmockPolkit(bus)
        except RuntimeError as e:
            pytest.skip(str(e))
        try:
            yield from setup(bus, Tree.make(tmp_path_factory.mktemp("fuzz")))
        finally:
            polkit.close()
    finally:
        bus.close()


def check_reply(call: dict[str, Any], caller: Caller) -> str:
    r = caller.call(
        call["member"],
        call.get("signature", ""),
        call.get("body", []),
        **{k: v for k, v in call.items() if k in ("path", "interface", "interactive")},
    )
    assert r.local_error is None, f"{call}: the client could not send it: {r.local_error}"
    if r.error is not None:
        assert r.error.startswith(BROKER_ERRORS) or r.error in ALLOWED_FREEDESKTOP, f"{call} -> {r}"
        assert r.message, f"{call} -> {r}"  # (it may quote the caller's own odd input back)
        return r.error.rsplit(".", 1)[1]
    return "ok"


def test_fuzz_the_running_daemon_with_random_calls(fuzz_env: SystemSetup) -> None:
    env = fuzz_env
    caller = env.callers(NOBODY)
    # Warm up everything that keeps fds for good (probe results, the caller's connection).
    for name in NAMES[:4]:
        caller.call("GetCapabilities", "s", [name])
    caller.call("Resolve", "sas", ["gpu", ["virgl"]])
    baseline = env.daemon.fd_count()
    outcomes: dict[str, int] = {}

    @settings(
        max_examples=300,
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
        ],
    )
    @given(calls())
    def one(call: dict[str, Any]) -> None:
        outcome = check_reply(call, caller)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        assert env.daemon.proc.poll() is None, env.daemon.log()[-3000:]

    one()
    total = sum(outcomes.values())
    print(
        f"\nfuzz: {total} random calls against the daemon; "
        f"outcomes {dict(sorted(outcomes.items()))}"
    )
    assert total >= MIN_CASES, outcomes
    # Calls that reached each layer: argument checks, the option checks, and polkit.
    assert {"NotFound", "InvalidOption", "InvalidSocket", "UnknownMethod"} <= set(outcomes), (
        outcomes
    )
    assert env.daemon.proc.poll() is None
    assert len(caller.descriptors()) == 4
    assert env.running() == [], "the fuzz started a backend although polkit said no"
    fd_dir = f"/proc/{env.daemon.proc.pid}/fd"

    def open_fds() -> str:
        return str(sorted(os.readlink(f"{fd_dir}/{fd}") for fd in os.listdir(fd_dir)))

    wait_for(
        lambda: env.daemon.fd_count() == baseline,
        lambda: f"the daemon's fds to be back at {baseline}, not {open_fds()}",
    )
    # No traceback, and no line a caller's input forged: each one is the daemon's own.
    log = env.daemon.log()
    assert "Traceback" not in log, log[-5000:]
    forged = [line for line in log.splitlines() if not line.startswith("vhostuserd[")]
    assert not forged, forged[:10]


def test_names_that_are_not_utf8_are_diagnosed_and_the_daemon_survives(
    fuzz_env: SystemSetup,
) -> None:
    """D-Bus strings are UTF-8. A descriptor file whose name is not used to make the
    daemon exit: at start-up (exporting it failed) and live (the directory watch died)."""
    env = fuzz_env
    caller = env.callers(NOBODY)
    data = os.fsencode(str(env.tree.dir("data")))
    bad = data + b"/\xff-late.json"
    with open(bad, "w") as f:
        f.write(json.dumps(descriptor_doc("gpu", "/usr/bin/true")))
    try:
        shown = str(env.tree.dir("data")) + "/\\xff-late.json"

        def diagnosed() -> bool:
            return any(
                p == shown and level == "error" for p, level, _ in caller.prop("Diagnostics")
            )

        wait_for(diagnosed, "the live index to diagnose the file")
        assert env.daemon.proc.poll() is None
        assert len(caller.descriptors()) == 4
        # And a later, ordinary change is still seen: the watch works again.
        good = env.tree.write("data", "60-late.json", descriptor_doc("gpu", "/usr/bin/true"))
        wait_for(
            lambda: "60-late.json" in {d["name"] for d in caller.descriptors()}, "a new descriptor"
        )
        good.unlink()
        wait_for(lambda: len(caller.descriptors()) == 4, "the descriptor to go")
    finally:
        os.unlink(bad)
    r = caller.call("Resolve", "sas", ["gpu", []])
    assert r.ok, str(r)


# ---------------------------------------------------------------- the lookup core

ENTRY_KINDS = [
    "bytes",
    "bytes",
    "json",
    "empty",
    "devnull",
    "fifo",
    "dir",
    "loop",
    "dangling",
    "sparse",
]
FILE_NAMES = [
    b"10-a.json",
    b"20-b.json",
    b"\xff.json",
    b"caf\xc3\xa9.json",
    b"\xe9t\xe9.json",
    b".h.json",
    b"x.txt",
    b".json",
]


def json_docs() -> st.SearchStrategy[bytes]:
    doc = st.fixed_dictionaries(
        {},
        optional={
            "type": st.sampled_from(["gpu", "fs", "", 3]),
            "binary": st.sampled_from(["/usr/bin/x", "x", "/", None]),
            "description": st.text(max_size=5),
            "tags": st.lists(st.text(max_size=3), max_size=2),
        },
    )
    return doc.map(lambda d: json.dumps(d).encode())


@st.composite
def listings(draw: st.DrawFn) -> list[dict[bytes, tuple[str, bytes]]]:
    n = draw(st.integers(1, 3))
    return [
        draw(
            st.dictionaries(
                st.sampled_from(FILE_NAMES),
                st.tuples(st.sampled_from(ENTRY_KINDS), st.binary(max_size=64) | json_docs()),
                max_size=6,
            )
        )
        for _ in range(n)
    ]


def _write(d: bytes, name: bytes, kind: str, data: bytes) -> None:
    path = d + b"/" + name
    if kind in ("bytes", "json"):
        with open(path, "wb") as f:
            f.write(data)
    elif kind == "empty":
        open(path, "wb").close()
    elif kind == "devnull":
        os.symlink(b"/dev/null", path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        os.mkdir(path)
    elif kind == "loop":
        os.symlink(name, path)
    elif kind == "dangling":
        os.symlink(b"/nonexistent/x", path)
    elif kind == "sparse":
        with open(path, "wb") as f:
            f.truncate(MAX_DESCRIPTOR_SIZE + 1 + len(data))


def _sendable(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\0" not in s


@settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(listings())
def test_fuzz_scan_and_merge_never_raise_and_explain_every_rejection(
    contents: list[dict[bytes, tuple[str, bytes]]],
) -> None:
    with tempfile.TemporaryDirectory() as root:
        dirs = []
        for i, entries in enumerate(contents):
            d = os.fsencode(root) + f"/d{i}".encode()
            os.mkdir(d)
            for name, (kind, data) in entries.items():
                _write(d, name, kind, data)
            dirs.append(lookup.Directory(["user", "sysconf", "data"][i], os.fsdecode(d)))
        listings_ = scan.list_all(dirs)
        result = lookup.merge(listings_)
        # Every winner is a descriptor, masked, or has exactly one error saying why.
        winners: dict[str, str] = {}
        for listing in listings_:
            for name in listing.entries:
                winners.setdefault(name, f"{listing.directory.path}/{name}")
        described = {d.name for d in result.descriptors}
        errors = [x.path for x in result.diagnostics if x.level == ERROR]
        for name, path in winners.items():
            parsed = next(lst.entries[name] for lst in listings_ if name in lst.entries)
            if name in described:
                assert parsed.descriptor is not None
            elif parsed.masked:
                assert path not in errors, (path, result.diagnostics)
            else:
                assert errors.count(path) == 1, (path, result.diagnostics)
        # What the daemon serves (the live index) is the same, except for names that are
        # not UTF-8: D-Bus cannot carry them, so they are reported instead, once each.
        feed = Feed(Index(dirs))
        index = feed.index
        feed.rescan()
        unsendable = {d.name for d in result.descriptors if not _sendable(d.path)}
        assert [d for d in index.descriptors] == [
            d for d in result.descriptors if d.name not in unsendable
        ]
        index_errors = [x.path for x in index.diagnostics if x.level == ERROR]
        for i, entries in enumerate(contents):
            for name, (kind, _) in entries.items():
                if not scan.is_candidate_name(os.fsdecode(name)) or kind == "dir":
                    continue
                try:
                    name.decode("utf-8")
                except UnicodeDecodeError:
                    shown = (os.fsencode(dirs[i].path) + b"/" + name).decode(
                        "utf-8", "backslashreplace"
                    )
                    assert index_errors.count(shown) == 1, (shown, index.diagnostics)
        for d in index.descriptors:
            for s in (d.name, d.path, d.type, d.binary, d.description, *d.tags):
                assert _sendable(s), d
        for x in index.diagnostics:
            assert _sendable(x.path) and _sendable(x.message) and x.message, x
        # The order of rule 5, each name once.
        names = [d.name for d in result.descriptors]
        assert names == sorted(names, key=lookup.sort_key) and len(set(names)) == len(names)
        for x in result.diagnostics:
            assert x.message, x
