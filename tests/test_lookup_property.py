"""Property tests: the real lookup against a tiny independent model, and parser fuzzing.

`test_merge_matches_reference_model` writes random tier trees to disk (several XDG data
dirs, duplicates and relative entries among them, valid, empty, broken, unknown-type,
symlinked and directory entries) and compares scan + merge with `reference_lookup`, which
restates docs/contract.md section 1 in a few lines without using the package. The fuzz tests feed
`parse_descriptor` random bytes and random JSON values: it must never raise, and its
decision must match an independent statement of rule 6.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vhostuserd.core import lookup
from vhostuserd.core.descriptors import ERROR, WARNING, parse_descriptor
from vhostuserd.edges import scan

# ---------------------------------------------------------------- the reference model

QEMU_TYPES = {
    "9p",
    "balloon",
    "block",
    "caif",
    "console",
    "crypto",
    "gpu",
    "input",
    "net",
    "rng",
    "rpmsg",
    "rproc-serial",
    "scsi",
    "vsock",
    "fs",
}

KINDS = [
    "valid",
    "valid",
    "unknown-type",
    "empty",
    "bad-json",
    "bad-schema",
    "dir",
    "dangling",
    "link-valid",
    "link-empty",
]
NAMES = [
    "10-a.json",
    "2-b.json",
    "100-c.json",
    "A.json",
    "a.json",
    "_x.json",
    "z\u00e9.json",
    "50-qemu-gpu.json",
    ".hidden.json",
    "README",
    "50-qemu-gpu.json~",
    "x.json.rpmsave",
]
TYPES = ["gpu", "fs", "input"]


@dataclass(frozen=True)
class Entry:
    kind: str
    btype: str

    @property
    def written_type(self) -> str:
        return "sound" if self.kind == "unknown-type" else self.btype


def is_candidate(name: str) -> bool:
    return name.endswith(".json") and not name.startswith(".") and name != ".json"


def reference_dirs(tree: Path, data_entries: list[str], system: bool) -> list[tuple[str, str]]:
    """(tier, directory) most specific first, per docs/contract.md section 1's table."""
    dirs = [] if system else [("user", f"{tree}/home/.config/qemu/vhost-user")]
    dirs.append(("sysconf", f"{tree}/etc/qemu/vhost-user"))
    seen: list[str] = []
    for entry in data_entries:
        if entry.startswith("/") and entry not in seen:
            seen.append(entry)
    return dirs + [("data", f"{d}/qemu/vhost-user") for d in seen]


def reference_lookup(
    dirs: list[tuple[str, str]], files: dict[tuple[str, str], Entry]
) -> tuple[list[tuple[str, str, str, str]], list[str], list[str]]:
    """(entries as (name, path, tier, type) in order, error paths, warning paths)."""
    winners: dict[str, tuple[str, str, Entry]] = {}
    for tier, directory in dirs:
        for (where, name), entry in sorted(files.items()):
            if where != directory or not is_candidate(name) or entry.kind == "dir":
                continue
            winners.setdefault(name, (tier, f"{directory}/{name}", entry))
    out, errs, warns = [], [], []
    for name in sorted(winners, key=lambda n: n.encode()):
        tier, path, entry = winners[name]
        if entry.kind in ("valid", "unknown-type", "link-valid"):
            out.append((name, path, tier, entry.written_type))
            if entry.written_type not in QEMU_TYPES:
                warns.append(path)
        elif entry.kind in ("bad-json", "bad-schema", "dangling"):
            errs.append(path)
    return out, errs, warns


# ---------------------------------------------------------------- trees on disk


@st.composite
def trees(draw: st.DrawFn) -> tuple[int, list[int | str], bool, dict[tuple[int, str], Entry]]:
    """(number of data roots, XDG_DATA_DIRS entries, system, {(dir slot, name): entry}).

    Dir slots: 0 user, 1 sysconf, 2.. data roots. XDG_DATA_DIRS entries are data root
    indexes, or a relative string that must be ignored; at least one is absolute.
    """
    n_data = draw(st.integers(1, 3))
    order = draw(st.lists(st.integers(0, n_data - 1), min_size=1, max_size=4))
    entries: list[int | str] = list(order)
    if draw(st.booleans()):
        entries.insert(draw(st.integers(0, len(entries))), "relative/share")
    system = draw(st.booleans())
    files = draw(
        st.dictionaries(
            st.tuples(st.integers(0, 1 + n_data), st.sampled_from(NAMES)),
            st.builds(Entry, st.sampled_from(KINDS), st.sampled_from(TYPES)),
            max_size=14,
        )
    )
    return n_data, entries, system, files


def write_tree(root: Path, n_data: int, files: dict[tuple[int, str], Entry]) -> list[Path]:
    slots = [root / "home/.config", root / "etc"] + [root / f"data{i}" for i in range(n_data)]
    outside = root / "outside"
    outside.mkdir()
    (outside / "empty").write_bytes(b"")
    for (slot, name), entry in files.items():
        d = slots[slot] / "qemu/vhost-user"
        d.mkdir(parents=True, exist_ok=True)
        path = d / name
        btype = entry.written_type
        valid = json.dumps({"description": "d", "type": btype, "binary": f"/usr/bin/{slot}-{name}"})
        if entry.kind in ("valid", "unknown-type"):
            path.write_text(valid)
        elif entry.kind == "empty":
            path.write_bytes(b"")
        elif entry.kind == "bad-json":
            path.write_text('{"type": ')
        elif entry.kind == "bad-schema":
            path.write_text(json.dumps({"type": btype, "binary": "relative/binary"}))
        elif entry.kind == "dir":
            path.mkdir()
        elif entry.kind == "dangling":
            path.symlink_to(outside / "missing")
        elif entry.kind == "link-valid":
            target = outside / f"{slot}-{name}"
            target.write_text(valid)
            path.symlink_to(target)
        elif entry.kind == "link-empty":
            path.symlink_to(outside / "empty")
    return slots


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees())
def test_merge_matches_reference_model(
    tree: tuple[int, list[int | str], bool, dict[tuple[int, str], Entry]],
) -> None:
    n_data, data_order, system, files = tree
    with tempfile.TemporaryDirectory(prefix="vhu-prop-") as tmp:
        root = Path(tmp)
        slots = write_tree(root, n_data, files)
        data_entries = [e if isinstance(e, str) else str(root / f"data{e}") for e in data_order]
        dirs = lookup.search_path(
            system=system,
            sysconfdir=str(root / "etc"),
            xdg_data_dirs=":".join(data_entries),
            xdg_config_home=str(root / "home/.config"),
            home=str(root / "home"),
        )
        expected_dirs = reference_dirs(root, data_entries, system)
        assert [(d.tier, d.path) for d in dirs] == expected_dirs

        result = lookup.merge(scan.list_all(dirs))

        by_dir = {(f"{slots[slot]}/qemu/vhost-user", name): e for (slot, name), e in files.items()}
        want, want_errors, want_warnings = reference_lookup(expected_dirs, by_dir)
        got = [(d.name, d.path, d.tier, d.type) for d in result.descriptors]
        assert got == want
        assert sorted(d.path for d in result.diagnostics if d.level == ERROR) == sorted(want_errors)
        assert sorted(d.path for d in result.diagnostics if d.level == WARNING) == sorted(
            want_warnings
        )
        assert len(result.diagnostics) == len(want_errors) + len(want_warnings)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees())
def test_shadowed_pairs_every_loser_with_the_winner(
    tree: tuple[int, list[int | str], bool, dict[tuple[int, str], Entry]],
) -> None:
    n_data, data_order, system, files = tree
    with tempfile.TemporaryDirectory(prefix="vhu-prop-") as tmp:
        root = Path(tmp)
        slots = write_tree(root, n_data, files)
        data_entries = [e if isinstance(e, str) else str(root / f"data{e}") for e in data_order]
        dirs = reference_dirs(root, data_entries, system)
        listings = scan.list_all([lookup.Directory(t, p) for t, p in dirs])
        first: dict[str, str] = {}
        want: list[tuple[str, str]] = []
        by_dir = {(f"{slots[slot]}/qemu/vhost-user", name): e for (slot, name), e in files.items()}
        for _, directory in dirs:
            for (where, name), entry in sorted(by_dir.items()):
                if where != directory or not is_candidate(name) or entry.kind == "dir":
                    continue
                path = f"{directory}/{name}"
                if name in first:
                    want.append((path, first[name]))
                else:
                    first[name] = path
        assert sorted(lookup.shadowed(listings)) == sorted(want)


# ---------------------------------------------------------------- parser fuzzing

MIB = 1024 * 1024


def reference_accepts(document: Any) -> bool:
    """Rule 6, restated: which decoded JSON documents are valid descriptors."""
    if not isinstance(document, dict) or has_lone_surrogate(document):
        return False
    btype, binary = document.get("type"), document.get("binary")
    if not isinstance(btype, str) or btype == "":
        return False
    if (
        not isinstance(binary, str)
        or not binary.startswith("/")
        or len(binary) < 2
        or "\0" in binary
    ):
        return False
    if "description" in document and not isinstance(document["description"], str):
        return False
    tags = document.get("tags", [])
    return isinstance(tags, list) and all(isinstance(t, str) for t in tags)


def has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, dict):
        return any(has_lone_surrogate(k) or has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(has_lone_surrogate(v) for v in value)
    return False


def check_parse_invariants(data: bytes) -> Any:
    """Parse ``data``; assert what holds for every input; return the parsed outcome."""
    path = "/fuzz/qemu/vhost-user/50-fuzz.json"
    parsed = parse_descriptor(data, path=path, name="50-fuzz.json", tier="sysconf")
    assert all(d.path == path for d in parsed.diagnostics), parsed
    assert parsed.masked == (data == b""), parsed
    if parsed.masked:
        assert parsed.descriptor is None and parsed.diagnostics == ()
    elif parsed.descriptor is None:
        [diag] = parsed.diagnostics  # rule 4: exactly one diagnostic for a broken file
        assert diag.level == ERROR and diag.message, diag
        assert parsed.broken
    else:
        d = parsed.descriptor
        assert (d.name, d.path, d.tier) == ("50-fuzz.json", path, "sysconf")
        assert d.binary.startswith("/") and len(d.binary) >= 2 and "\0" not in d.binary
        assert isinstance(d.type, str) and d.type
        assert all(isinstance(t, str) for t in d.tags)
        assert all(x.level == WARNING for x in parsed.diagnostics), parsed
        for text in (d.name, d.type, d.binary, d.description, *d.tags):
            text.encode("utf-8")  # printable, stat-able and marshallable
    return parsed


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
@example(b"")
@example(b"\xef\xbb\xbf{}")
@example(b"[" * 5000)
@example(b"NaN")
@example(b'{"type": "gpu", "binary": "/x", "binary": "rel"}')
def test_fuzz_parse_descriptor_random_bytes_never_raises(data: bytes) -> None:
    check_parse_invariants(data)


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=2)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
field_values = {
    "type": st.sampled_from(["gpu", "fs", "sound", "", "GPU"]) | json_values,
    "binary": st.sampled_from(["/usr/bin/x", "/", "//", "rel", "", "/a\0b", "/\u00e9", "/x\udc80"])
    | st.text(max_size=6).map(lambda s: "/" + s)
    | json_values,
    "description": st.text(max_size=10) | json_values,
    "tags": st.lists(st.text(max_size=4), max_size=3) | json_values,
    "features": json_values,
    "x-vendor": json_values,
}
descriptor_like = st.fixed_dictionaries(
    {}, optional={key: strategy for key, strategy in field_values.items()}
)


@settings(max_examples=500, deadline=None)
@given(descriptor_like | json_values, st.sampled_from([0, 2, None]))
def test_fuzz_parse_descriptor_json_values_match_rule6(document: Any, indent: int | None) -> None:
    data = json.dumps(document, indent=indent).encode()
    decoded = json.loads(data)  # \ud83d\ude00 pairs written separately decode to one character
    parsed = check_parse_invariants(data)
    assert (parsed.descriptor is not None) == reference_accepts(decoded), (decoded, parsed)
    if parsed.descriptor is not None:
        d = parsed.descriptor
        assert (d.type, d.binary) == (decoded["type"], decoded["binary"])
        assert d.tags == tuple(decoded.get("tags", ()))
        want_warnings = int(decoded["type"] not in QEMU_TYPES) + int("description" not in decoded)
        assert len(parsed.diagnostics) == want_warnings, parsed


@settings(max_examples=20, deadline=None)
@given(st.integers(-3, 3))
def test_fuzz_parse_descriptor_size_limit_is_exactly_1mib(delta: int) -> None:
    doc = json.dumps({"type": "gpu", "binary": "/usr/bin/x", "description": ""}).encode()
    data = doc + b" " * (MIB + delta - len(doc))
    parsed = check_parse_invariants(data)
    assert (parsed.descriptor is not None) == (len(data) <= MIB)
