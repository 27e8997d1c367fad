"""docs/contract.md section 1, rule by rule, on real directory trees.

Each test is named after the rule it checks. Trees are real files, symlinks, FIFOs and
directories under a temporary directory, read by the real scan and merged by the real
merge; the few things root cannot be denied are checked as uid 65534 (setpriv).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from busutil import Tree
from helpers_lookup import descriptor, errors, names, run_unprivileged

from vhostuserd.core import lookup
from vhostuserd.core.descriptors import (
    ERROR,
    KNOWN_TYPES,
    MAX_DESCRIPTOR_SIZE,
    WARNING,
    Capabilities,
    Descriptor,
    Diagnostic,
    ProbeError,
    ProbeResult,
    parse_capabilities,
    parse_descriptor,
)
from vhostuserd.core.index import Index
from vhostuserd.core.resolve import EXPLAIN_MAX, resolve
from vhostuserd.edges import scan
from vhostuserd.edges.probe import DEFAULT_TIMEOUT, STDOUT_CAP, binary_identity
from vhostuserd.edges.watch import Feed


@pytest.fixture
def t(tmp_path: Path) -> Tree:
    return Tree(tmp_path)


def only_error(diagnostics: tuple[Diagnostic, ...], path: Path) -> Diagnostic:
    """The single error diagnostic, which must name ``path``."""
    errs = errors(diagnostics)
    assert len(errs) == 1, f"expected exactly one error, got {diagnostics}"
    assert errs[0].path == str(path), errs[0]
    assert str(errs[0]).startswith(f"{path}: error: "), str(errs[0])
    return errs[0]


def parse(
    doc: object, path: str = "/x/50-test.json"
) -> tuple[Descriptor | None, tuple[Diagnostic, ...]]:
    data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    parsed = parse_descriptor(data, path=path, name=os.path.basename(path), tier="data")
    return parsed.descriptor, parsed.diagnostics


# ================================================================ rule 1: candidates


def test_rule1_only_json_files_directly_in_dir_are_candidates(t: Tree) -> None:
    t.write("data", "50-a.json", descriptor())
    for other in [
        "README",
        "50-b.json~",
        "50-b.json.rpmsave",
        "50-b.JSON",
        "50-b.jsonx",
        "json",
        "50-b.json.dpkg-new",
    ]:
        t.write("data", other, descriptor())
    sub = t.dir("data") / "sub"
    sub.mkdir()
    (sub / "50-c.json").write_text(json.dumps(descriptor()))
    result = t.lookup()
    assert names(result) == ["50-a.json"]
    assert result.diagnostics == ()


@pytest.mark.parametrize(
    "name",
    ["50-nosuch.json", "", "../50-gpu.json", "../../etc/passwd", "/etc/passwd", "n" * 4096],
    ids=["unknown", "empty", "relative-path", "traversal", "absolute-path", "4096-chars"],
)
def test_rule1_only_a_basename_of_the_effective_index_is_found(tmp_path: Path, name: str) -> None:
    directory = tmp_path / "qemu/vhost-user"
    directory.mkdir(parents=True)
    (directory / "50-gpu.json").write_text(
        '{"description": "d", "type": "gpu", "binary": "/usr/bin/true"}'
    )
    feed = Feed(Index([lookup.Directory("data", str(directory))]))
    feed.rescan()
    # What Spawn and GetCapabilities look names up in: a path, a traversal, a name that is
    # not there, an empty or a huge one is no descriptor (NotFound).
    assert feed.index.get("50-gpu.json") is not None
    assert feed.index.get(str(directory / "50-gpu.json")) is None, "a path is no name"
    assert feed.index.get(name) is None


def test_rule1_other_names_do_not_shadow(t: Tree) -> None:
    t.write("data", "50-a.json", descriptor(binary="/usr/bin/data"))
    t.write("sysconf", "50-a.json.rpmsave", b"")
    t.write("sysconf", "50-a.json~", b"{broken")
    [d] = t.lookup().descriptors
    assert d.binary == "/usr/bin/data"


def test_rule1_hidden_names_ignored(t: Tree) -> None:
    t.write("data", "50-a.json", descriptor(binary="/usr/bin/data"))
    t.write("sysconf", ".50-a.json", b"")  # would mask if it counted
    t.write("sysconf", ".50-b.json", b"{not json")  # would be an error if it counted
    t.write("sysconf", ".json", descriptor())
    # An Emacs lock file: a dangling symlink named .#NAME.
    t.symlink("sysconf", ".#50-a.json", "root@host.1234:1700000000")
    result = t.lookup()
    assert names(result) == ["50-a.json"]
    assert result.descriptors[0].binary == "/usr/bin/data"
    assert result.diagnostics == ()


def test_rule1_directory_named_x_json_is_not_candidate(t: Tree) -> None:
    t.write("data", "50-a.json", descriptor(binary="/usr/bin/data"))
    (t.dir("sysconf") / "50-a.json").mkdir()  # must neither shadow nor be diagnosed
    (t.dir("sysconf") / "60-b.json").mkdir()
    result = t.lookup()
    assert names(result) == ["50-a.json"]
    assert result.descriptors[0].tier == "data"
    assert result.diagnostics == ()


def test_rule1_symlink_to_directory_is_not_candidate(t: Tree) -> None:
    t.write("data", "50-a.json", descriptor(binary="/usr/bin/data"))
    t.symlink("sysconf", "50-a.json", t.root)
    result = t.lookup()
    assert [(d.name, d.tier) for d in result.descriptors] == [("50-a.json", "data")]
    assert result.diagnostics == ()


def test_rule1_dangling_symlink_is_unreadable_candidate(t: Tree) -> None:
    t.write("data", "50-a.json", descriptor())
    link = t.symlink("sysconf", "50-a.json", t.root / "gone.json")
    result = t.lookup()
    assert names(result) == [], "a dangling symlink must shadow the data file (rule 4)"
    error = only_error(result.diagnostics, link)
    assert "dangling symlink" in error.message


def test_rule1_looping_symlink_is_unreadable_candidate(t: Tree) -> None:
    t.write("data", "50-a.json", descriptor())
    d = t.dir("sysconf")
    (d / "50-a.json").symlink_to(d / "loop.json")
    (d / "loop.json").symlink_to(d / "50-a.json")
    result = t.lookup()
    assert names(result) == []
    messages = {e.path: e.message for e in errors(result.diagnostics)}
    assert set(messages) == {str(d / "50-a.json"), str(d / "loop.json")}, messages
    assert all("symlink loop" in m for m in messages.values()), messages


def test_rule1_self_looping_symlink_is_unreadable_candidate(t: Tree) -> None:
    link = t.dir("data") / "50-self.json"
    link.symlink_to(link)
    result = t.lookup()
    assert "symlink loop" in only_error(result.diagnostics, link).message


def test_rule1_symlink_to_file_is_listed_under_its_own_name_and_path(t: Tree) -> None:
    target = t.root / "elsewhere" / "real-backend.json"
    target.parent.mkdir()
    target.write_text(json.dumps(descriptor(binary="/opt/real")))
    link = t.symlink("sysconf", "40-linked.json", target)
    [d] = t.lookup().descriptors
    assert (d.name, d.path, d.tier, d.binary) == (
        "40-linked.json",
        str(link),
        "sysconf",
        "/opt/real",
    )


def test_rule1_missing_directory_is_empty_without_diagnostic(tmp_path: Path) -> None:
    dirs = lookup.search_path(
        system=False,
        sysconfdir=str(tmp_path / "no-etc"),
        xdg_data_dirs=str(tmp_path / "no-data"),
        xdg_config_home=str(tmp_path / "no-config"),
        home=str(tmp_path),
    )
    result = lookup.merge(scan.list_all(dirs))
    assert result == lookup.LookupResult((), ())


def test_rule1_search_path_entry_that_is_a_file_is_a_warning(t: Tree) -> None:
    t.write("data", "50-a.json", descriptor())
    (t.sysconfdir / "qemu").mkdir()
    (t.sysconfdir / "qemu" / "vhost-user").write_text("not a directory")
    result = t.lookup()
    assert names(result) == ["50-a.json"]
    [diag] = result.diagnostics
    assert (diag.path, diag.level) == (str(t.sysconfdir / "qemu/vhost-user"), WARNING)


def test_rule1_fifo_named_x_json_is_diagnosed_without_hanging(t: Tree) -> None:
    t.write("data", "50-a.json", descriptor())
    fifo = t.dir("sysconf") / "50-a.json"
    os.mkfifo(fifo)
    outcome: list[lookup.LookupResult | BaseException] = []

    def run() -> None:
        try:
            outcome.append(t.lookup())
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            outcome.append(e)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(5.0)
    if worker.is_alive():
        with open(fifo, "wb"):  # a writer unblocks the stuck reader, so the thread can end
            pass
        pytest.fail("listing a directory with a FIFO named x.json hung")
    [result] = outcome
    assert isinstance(result, lookup.LookupResult), result
    assert names(result) == [], "the FIFO is a candidate that cannot be read: it shadows"
    assert "not a regular file" in only_error(result.diagnostics, fifo).message


def test_rule1_symlink_to_dev_null_hides_the_name(t: Tree) -> None:
    # The systemd way of masking. Whatever the diagnostic, the name must not come through.
    t.write("data", "50-a.json", descriptor())
    t.symlink("sysconf", "50-a.json", "/dev/null")
    assert names(t.lookup()) == []


def test_rule1_socket_named_x_json_is_diagnosed(t: Tree) -> None:
    import socket

    path = t.dir("data") / "50-sock.json"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))
        result = t.lookup()
    assert "not a regular file" in only_error(result.diagnostics, path).message


@pytest.fixture
def world_tree() -> Iterator[Tree]:
    """A tree uid 65534 can reach (tmp_path's parents are private to root)."""
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip(
            "running as root and setpriv (util-linux) is missing: modes 000 cannot be enforced"
        )
    root = Path(tempfile.mkdtemp(prefix="vhu-nobody-"))
    root.chmod(0o755)
    try:
        yield Tree(root)
    finally:
        for dirpath, dirnames, _ in os.walk(root):
            for d in dirnames:
                os.chmod(os.path.join(dirpath, d), 0o755, follow_symlinks=False)
        shutil.rmtree(root)


def lookup_as_nobody(t: Tree, locked: Path | None = None) -> dict[str, object]:
    """Scan + merge ``t`` as uid 65534 if we are root (``locked``: a directory it may
    traverse, not list)."""
    for dirpath, _, _ in os.walk(t.root):
        os.chmod(dirpath, 0o755)  # reachable by uid 65534 whatever the umask
    if locked is not None:
        locked.chmod(0o111)
    code = (
        "import json\n"
        "from vhostuserd.core import lookup\n"
        "from vhostuserd.edges import scan\n"
        f"dirs = lookup.search_path(system=False, sysconfdir={str(t.sysconfdir)!r},"
        f" xdg_data_dirs={t.xdg_data_dirs!r}, xdg_config_home={str(t.config_home)!r},"
        f" home={str(t.home)!r})\n"
        "r = lookup.merge(scan.list_all(dirs))\n"
        "print(json.dumps({'names': [d.name for d in r.descriptors],"
        " 'diagnostics': [list(d.as_tuple()) for d in r.diagnostics]}))\n"
    )
    proc = run_unprivileged(code)
    assert proc.returncode == 0, f"scan as uid 65534 raised:\n{proc.stderr}"
    out: dict[str, object] = json.loads(proc.stdout)
    return out


def test_rule1_unreadable_file_is_diagnosed(world_tree: Tree) -> None:
    t = world_tree
    t.write("data", "50-a.json", descriptor())
    t.write("data", "60-b.json", descriptor())
    secret = t.write("sysconf", "50-a.json", descriptor())
    t.dir("user")
    secret.chmod(0o000)
    out = lookup_as_nobody(t)
    assert out["names"] == ["60-b.json"], "an unreadable sysconf file must still shadow"
    assert out["diagnostics"] == [[str(secret), ERROR, "cannot be read: permission denied"]], out[
        "diagnostics"
    ]


def test_rule1_unlistable_directory_is_diagnosed(world_tree: Tree) -> None:
    t = world_tree
    t.write("data", "50-a.json", descriptor())
    t.write("sysconf", "40-hidden.json", descriptor())
    t.dir("user")
    out = lookup_as_nobody(t, locked=t.dir("sysconf"))
    assert out["names"] == ["50-a.json"]
    assert out["diagnostics"] == [
        [str(t.dir("sysconf")), ERROR, "cannot be listed: Permission denied"]
    ]


def test_rule1_every_unusable_entry_is_a_diagnostic_never_an_exception(t: Tree) -> None:
    d = t.dir("data")
    bad: dict[str, str] = {}
    (d / "10-dangling.json").symlink_to(t.root / "missing")
    bad["10-dangling.json"] = "dangling symlink"
    (d / "11-loop.json").symlink_to(d / "11-loop.json")
    bad["11-loop.json"] = "symlink loop"
    os.mkfifo(d / "12-fifo.json")
    bad["12-fifo.json"] = "not a regular file"
    with open(d / "13-big.json", "wb") as f:
        f.truncate(MAX_DESCRIPTOR_SIZE + 1)
    bad["13-big.json"] = f"larger than {MAX_DESCRIPTOR_SIZE} bytes"
    (d / "14-latin1.json").write_bytes(b'{"type": "gpu", "binary": "/x", "description": "caf\xe9"}')
    bad["14-latin1.json"] = "not valid UTF-8"
    (d / "15-text.json").write_text("type=gpu\n")
    bad["15-text.json"] = "not valid JSON"
    (d / "16-list.json").write_text("[]")
    bad["16-list.json"] = "/: must be a JSON object"
    (d / "17-deep.json").write_text("[" * 100000 + "]" * 100000)
    bad["17-deep.json"] = "not valid JSON"
    (d / "18-nul.json").write_text(json.dumps(descriptor(binary="/usr/bin/a\0b")))
    bad["18-nul.json"] = "/binary"
    (d / "19-surrogate.json").write_text(
        '{"type": "gpu", "binary": "/x\\ud800", "description": ""}'
    )
    bad["19-surrogate.json"] = "lone surrogate"
    (d / "20-dir.json").mkdir()
    t.write("data", "99-good.json", descriptor())
    result = t.lookup()
    assert names(result) == ["99-good.json"]
    by_path = {diag.path: diag for diag in result.diagnostics}
    assert set(by_path) == {str(d / n) for n in bad}, sorted(by_path)
    for name, needle in bad.items():
        diag = by_path[str(d / name)]
        assert diag.level == ERROR and needle in diag.message, diag


# ================================================================ rule 2: override by basename


def test_rule2_most_specific_tier_wins(t: Tree) -> None:
    t.write("data", "50-a.json", descriptor(binary="/usr/bin/data"))
    t.write("sysconf", "50-a.json", descriptor(binary="/usr/bin/sysconf"))
    t.write("user", "50-a.json", descriptor(binary="/usr/bin/user"))
    t.write("data", "60-b.json", descriptor(binary="/usr/bin/data"))
    t.write("sysconf", "60-b.json", descriptor(binary="/usr/bin/sysconf"))
    t.write("data", "70-c.json", descriptor(binary="/usr/bin/data"))
    result = t.lookup()
    assert [(d.name, d.tier, d.binary) for d in result.descriptors] == [
        ("50-a.json", "user", "/usr/bin/user"),
        ("60-b.json", "sysconf", "/usr/bin/sysconf"),
        ("70-c.json", "data", "/usr/bin/data"),
    ]
    assert result.descriptors[0].path == str(t.dir("user") / "50-a.json")


def test_rule2_xdg_data_dirs_first_entry_wins(tmp_path: Path) -> None:
    t = Tree(tmp_path, data_count=3)
    for i in range(3):
        t.write("data", "50-all.json", descriptor(binary=f"/usr/bin/d{i}"), index=i)
    t.write("data", "60-later.json", descriptor(binary="/usr/bin/d1"), index=1)
    t.write("data", "60-later.json", descriptor(binary="/usr/bin/d2"), index=2)
    t.write("data", "70-last.json", descriptor(binary="/usr/bin/d2"), index=2)
    result = t.lookup()
    assert [(d.name, d.binary) for d in result.descriptors] == [
        ("50-all.json", "/usr/bin/d0"),
        ("60-later.json", "/usr/bin/d1"),
        ("70-last.json", "/usr/bin/d2"),
    ]
    assert {d.tier for d in result.descriptors} == {"data"}


def test_rule2_sysconf_overrides_every_data_dir(tmp_path: Path) -> None:
    t = Tree(tmp_path, data_count=2)
    t.write("data", "50-a.json", descriptor(binary="/usr/bin/d0"), index=0)
    t.write("data", "50-a.json", descriptor(binary="/usr/bin/d1"), index=1)
    t.write("sysconf", "50-a.json", descriptor(binary="/usr/bin/etc"))
    assert [d.binary for d in t.lookup().descriptors] == ["/usr/bin/etc"]


def test_rule2_system_mode_has_no_user_tier(t: Tree) -> None:
    t.write("data", "50-a.json", descriptor(binary="/usr/bin/data"))
    t.write("user", "50-a.json", descriptor(binary="/home/mallory/evil"))
    t.write("user", "40-mine.json", descriptor(binary="/home/mallory/evil"))
    assert [d.tier for d in t.search_path(system=True)] == ["sysconf", "data"]
    result = t.lookup(system=True)
    assert [(d.name, d.binary) for d in result.descriptors] == [("50-a.json", "/usr/bin/data")]
    assert [(d.name, d.tier) for d in t.lookup().descriptors] == [
        ("40-mine.json", "user"),
        ("50-a.json", "user"),
    ]


def test_rule2_shadowed_names_the_losers_and_their_winner(tmp_path: Path) -> None:
    t = Tree(tmp_path, data_count=2)
    user = t.write("user", "50-a.json", descriptor())
    etc = t.write("sysconf", "50-a.json", b"")
    d0 = t.write("data", "50-a.json", descriptor(), index=0)
    d1 = t.write("data", "50-a.json", b"{broken", index=1)
    t.write("data", "60-alone.json", descriptor(), index=1)
    pairs = sorted(lookup.shadowed(t.listings()))
    assert pairs == sorted([(str(etc), str(user)), (str(d0), str(user)), (str(d1), str(user))])


def test_rule2_search_path_order_and_xdg_defaults(tmp_path: Path) -> None:
    def tiers(**kw: object) -> list[tuple[str, str]]:
        args: dict[str, object] = {
            "system": False,
            "sysconfdir": "/etc",
            "xdg_data_dirs": None,
            "xdg_config_home": None,
            "home": "/home/u",
        }
        args.update(kw)
        return [(d.tier, d.path) for d in lookup.search_path(**args)]  # type: ignore[arg-type]

    assert tiers() == [
        ("user", "/home/u/.config/qemu/vhost-user"),
        ("sysconf", "/etc/qemu/vhost-user"),
        ("data", "/usr/local/share/qemu/vhost-user"),
        ("data", "/usr/share/qemu/vhost-user"),
    ]
    assert tiers(xdg_data_dirs="") == tiers()
    assert tiers(xdg_data_dirs="relative:also/relative") == tiers()
    assert tiers(xdg_data_dirs="/a:rel:/b/:/a") == [
        ("user", "/home/u/.config/qemu/vhost-user"),
        ("sysconf", "/etc/qemu/vhost-user"),
        ("data", "/a/qemu/vhost-user"),
        ("data", "/b/qemu/vhost-user"),
    ]
    assert tiers(xdg_config_home="/cfg")[0] == ("user", "/cfg/qemu/vhost-user")
    assert tiers(xdg_config_home="relative")[0] == ("user", "/home/u/.config/qemu/vhost-user")
    assert tiers(sysconfdir="/var/lib")[1] == ("sysconf", "/var/lib/qemu/vhost-user")
    assert [tier for tier, _ in tiers(system=True)] == ["sysconf", "data", "data"]


# ================================================================ libvirt-style trees


def test_rule2_libvirt_symlink_into_masked_file_is_still_listed(t: Tree) -> None:
    # libvirt's test case V1: 60-gpu.json links to 30-gpu.json, which is masked by name.
    real = t.write("data", "30-gpu.json", descriptor(binary="/usr/libexec/gpu"))
    t.write("sysconf", "30-gpu.json", b"")
    link = t.symlink("user", "60-gpu.json", real)
    result = t.lookup()
    assert [(d.name, d.path, d.tier, d.binary) for d in result.descriptors] == [
        ("60-gpu.json", str(link), "user", "/usr/libexec/gpu"),
    ]
    assert result.diagnostics == ()


def test_rule2_masking_goes_by_basename_never_by_target(t: Tree) -> None:
    real = t.write("data", "50-qemu-gpu.json", descriptor(binary="/usr/lib/qemu/vhost-user-gpu"))
    t.write("data", "50-qemu-virtiofsd.json", descriptor("fs", "/usr/lib/qemu/virtiofsd"))
    # sysconf masks 50-qemu-gpu.json; two other names point at the very same file.
    t.write("sysconf", "50-qemu-gpu.json", b"")
    t.symlink("sysconf", "10-local-gpu.json", real)
    t.symlink("user", "20-my-gpu.json", "../../../../" + str(real.relative_to(t.root)))
    result = t.lookup()
    assert names(result) == ["10-local-gpu.json", "20-my-gpu.json", "50-qemu-virtiofsd.json"]
    assert {d.binary for d in result.descriptors if d.type == "gpu"} == {
        "/usr/lib/qemu/vhost-user-gpu"
    }


def test_rule2_symlinked_name_overrides_same_name_below(t: Tree) -> None:
    other = t.write("data", "70-a.json", descriptor(binary="/usr/bin/a"))
    t.write("data", "70-b.json", descriptor(binary="/usr/bin/b"))
    t.symlink("sysconf", "70-b.json", other)
    result = t.lookup()
    assert [(d.name, d.tier, d.binary) for d in result.descriptors] == [
        ("70-a.json", "data", "/usr/bin/a"),
        ("70-b.json", "sysconf", "/usr/bin/a"),
    ]


def test_rule3_symlink_to_empty_file_masks_its_own_name(t: Tree) -> None:
    empty = t.root / "empty"
    empty.write_bytes(b"")
    t.write("data", "50-a.json", descriptor())
    t.write("data", "50-b.json", descriptor())
    t.symlink("sysconf", "50-a.json", empty)
    result = t.lookup()
    assert names(result) == ["50-b.json"]
    assert result.diagnostics == ()


def test_rule4_symlink_to_broken_file_is_broken_under_its_own_path(t: Tree) -> None:
    target = t.root / "broken-target.json"
    target.write_text(json.dumps({"type": "gpu", "binary": "relative"}))
    t.write("data", "50-a.json", descriptor())
    link = t.symlink("sysconf", "50-a.json", target)
    result = t.lookup()
    assert names(result) == []
    assert "/binary" in only_error(result.diagnostics, link).message


# ================================================================ rule 3: zero-length masks


def test_rule3_zero_length_masks_name(t: Tree) -> None:
    t.write("data", "50-a.json", descriptor())
    t.write("data", "60-b.json", descriptor())
    t.write("sysconf", "50-a.json", b"")
    result = t.lookup()
    assert names(result) == ["60-b.json"]
    assert result.diagnostics == ()


def test_rule3_zero_length_in_user_tier_masks_sysconf_and_data(t: Tree) -> None:
    t.write("data", "50-a.json", descriptor())
    t.write("sysconf", "50-a.json", descriptor())
    t.write("user", "50-a.json", b"")
    assert names(t.lookup()) == []
    assert [d.tier for d in t.lookup(system=True).descriptors] == ["sysconf"]


def test_rule3_zero_length_in_first_data_dir_masks_later_data_dirs(tmp_path: Path) -> None:
    t = Tree(tmp_path, data_count=2)
    t.write("data", "50-a.json", b"", index=0)
    t.write("data", "50-a.json", descriptor(), index=1)
    assert names(t.lookup()) == []


def test_rule3_mask_without_counterpart_just_disappears(t: Tree) -> None:
    t.write("sysconf", "50-nothing.json", b"")
    assert t.lookup() == lookup.LookupResult((), ())


def test_rule3_less_specific_mask_does_not_hide_more_specific_file(t: Tree) -> None:
    t.write("data", "50-a.json", b"")
    t.write("sysconf", "50-a.json", descriptor(binary="/usr/bin/etc"))
    assert [d.binary for d in t.lookup().descriptors] == ["/usr/bin/etc"]


def test_rule3_whitespace_only_file_is_not_a_mask_but_broken(t: Tree) -> None:
    t.write("data", "50-a.json", descriptor())
    ws = t.write("sysconf", "50-a.json", b"\n")
    result = t.lookup()
    assert names(result) == []
    assert "not valid JSON" in only_error(result.diagnostics, ws).message


# ================================================================ rule 4: broken files shadow


def test_rule4_broken_sysconf_file_shadows_valid_data_file(t: Tree) -> None:
    t.write("data", "50-qemu-gpu.json", descriptor(binary="/usr/lib/qemu/vhost-user-gpu"))
    t.write("data", "60-other.json", descriptor())
    broken = t.write("sysconf", "50-qemu-gpu.json", b'{"type": "gpu", "binary": "/usr/bin/x",')
    result = t.lookup()
    assert names(result) == ["60-other.json"], (
        "the admin's broken file must not let the data file through"
    )
    error = only_error(result.diagnostics, broken)
    assert error.message.startswith("not valid JSON"), error
    assert "line 1 column" in error.message, error


def test_rule4_schema_error_diagnostic_has_json_pointer(t: Tree) -> None:
    bad = t.write("sysconf", "50-a.json", descriptor(tags=["ok", 3]))
    result = t.lookup()
    assert names(result) == []
    assert only_error(result.diagnostics, bad).message.startswith("/tags/1: must be a string")


def test_rule4_one_diagnostic_carries_every_schema_error_with_its_pointer(t: Tree) -> None:
    bad = t.write("data", "50-a.json", {"type": 7, "binary": "bin", "description": ["x"]})
    result = t.lookup()
    reasons = only_error(result.diagnostics, bad).message.split("; ")
    assert [m.split(":")[0] for m in reasons] == ["/binary", "/description", "/type"], reasons


def test_rule4_invalid_utf8_is_diagnosed(t: Tree) -> None:
    bad = t.write("data", "50-a.json", b'{"type": "gpu", "binary": "/usr/bin/\xff"}')
    result = t.lookup()
    assert only_error(result.diagnostics, bad).message == "not valid UTF-8 (byte 36)"


def test_rule4_utf8_byte_order_mark_is_diagnosed_not_raised(t: Tree) -> None:
    bad = t.write("data", "50-a.json", b"\xef\xbb\xbf" + json.dumps(descriptor()).encode())
    result = t.lookup()
    assert names(result) == []
    only_error(result.diagnostics, bad)


def test_rule4_top_level_must_be_an_object(t: Tree) -> None:
    for i, doc in enumerate([[], "gpu", 1, None]):
        t.write("data", f"5{i}-a.json", json.dumps(doc))
    result = t.lookup()
    assert names(result) == []
    assert [d.message for d in result.diagnostics] == ["/: must be a JSON object"] * 4


def test_rule4_lone_surrogate_escape_is_rejected(t: Tree) -> None:
    bad = t.write("data", "50-a.json", '{"type": "gpu", "binary": "/usr/bin/\\udc80x"}')
    good = t.write("data", "60-b.json", '{"type": "gpu", "binary": "/usr/bin/\\ud83d\\ude00"}')
    result = t.lookup()
    assert [d.binary for d in result.descriptors] == ["/usr/bin/\U0001f600"]
    assert result.descriptors[0].path == str(good)
    assert "lone surrogate" in only_error(result.diagnostics, bad).message


def test_rule4_shadowed_broken_file_does_not_hide_the_winner(t: Tree) -> None:
    t.write("data", "50-a.json", b"{broken")
    t.write("sysconf", "50-a.json", descriptor(binary="/usr/bin/etc"))
    result = t.lookup()
    assert [d.binary for d in result.descriptors] == ["/usr/bin/etc"]
    assert errors(result.diagnostics) == []


# ================================================================ rule 5: byte order


def test_rule5_byte_order_sort(t: Tree) -> None:
    for name in [
        "20-x.json",
        "100-x.json",
        "a.json",
        "B.json",
        "Z.json",
        "_.json",
        "z\u00e9.json",
        "zz.json",
    ]:
        t.write("data", name, descriptor())
    assert names(t.lookup()) == [
        "100-x.json",
        "20-x.json",
        "B.json",
        "Z.json",
        "_.json",
        "a.json",
        "zz.json",
        "z\u00e9.json",
    ]


def test_rule5_byte_order_sort_is_by_bytes_on_disk_not_code_points(t: Tree) -> None:
    d = t.dir("data")
    # U+E000 is EE 80 80 in UTF-8, so it sorts before the raw byte FF; as code points the
    # surrogate-escaped FF (U+DCFF) would sort first.
    (d / "50-\ue000.json").write_text(json.dumps(descriptor()))
    (Path(os.fsdecode(os.fsencode(d) + b"/50-\xff.json"))).write_text(json.dumps(descriptor()))
    assert [os.fsencode(n) for n in names(t.lookup())] == [
        "50-\ue000.json".encode(),
        b"50-\xff.json",
    ]


def test_rule5_sort_spans_tiers(tmp_path: Path) -> None:
    t = Tree(tmp_path, data_count=2)
    t.write("user", "90-user.json", descriptor())
    t.write("sysconf", "10-etc.json", descriptor())
    t.write("data", "50-d0.json", descriptor(), index=0)
    t.write("data", "05-d1.json", descriptor(), index=1)
    assert names(t.lookup()) == ["05-d1.json", "10-etc.json", "50-d0.json", "90-user.json"]


def _d(name: str, btype: str = "gpu") -> Descriptor:
    return Descriptor(name, f"/x/{name}", "data", btype, "", f"/usr/bin/{name}")


def test_rule5_first_match_wins_by_type_and_every_feature() -> None:
    ds = [_d("10-input.json", "input"), _d("20-gpu.json"), _d("30-gpu.json"), _d("40-gpu.json")]
    caps: dict[str, ProbeResult] = {
        "20-gpu.json": Capabilities("gpu", ("virgl",), "{}"),
        "30-gpu.json": ProbeError("timeout", "no answer"),
        "40-gpu.json": Capabilities("gpu", ("render-node", "virgl"), "{}"),
    }
    r = resolve(ds, "gpu", ["virgl", "render-node"], lambda d: caps.get(d.name))
    assert r.chosen is not None and r.chosen.name == "40-gpu.json"
    assert [(x.name, x.reason) for x in r.rejections] == [
        ("10-input.json", "type is 'input'"),
        ("20-gpu.json", "feature missing: render-node"),
        ("30-gpu.json", "probe failed: timeout: no answer"),
    ]
    first = resolve(ds, "gpu", ["virgl"], lambda d: caps.get(d.name))
    assert first.chosen is not None and first.chosen.name == "20-gpu.json"


def test_rule5_no_features_takes_first_of_type_without_probing() -> None:
    probed: list[str] = []

    def caps(d: Descriptor) -> ProbeResult | None:
        probed.append(d.name)
        return None

    r = resolve([_d("10-a.json", "fs"), _d("20-b.json"), _d("30-c.json")], "gpu", [], caps)
    assert r.chosen is not None and r.chosen.name == "20-b.json"
    assert probed == []


def test_rule5_no_match_says_why_for_every_candidate() -> None:
    ds = [_d("10-a.json"), _d("20-b.json"), _d("30-c.json", "fs")]
    caps: dict[str, ProbeResult] = {"10-a.json": Capabilities("gpu", (), "{}")}
    r = resolve(ds, "gpu", ["virgl"], lambda d: caps.get(d.name))
    assert r.chosen is None
    text = r.explain("gpu", ["virgl"])
    assert "10-a.json: feature missing: virgl" in text
    assert "20-b.json: capabilities not probed yet" in text
    assert "1 descriptor(s) of other types" in text


def test_rule5_an_unknown_type_says_how_many_descriptors_are_of_other_types() -> None:
    ds = [_d("50-gpu.json"), _d("60-input.json", "input")]
    r = resolve(ds, "nosuch", [], lambda d: None)
    assert r.chosen is None
    text = r.explain("nosuch", [])
    assert "'nosuch'" in text and "2 descriptor(s) of other types" in text, text
    assert "50-gpu.json" not in text, "candidates of other types are counted, not named"


def test_rule5_an_empty_search_path_says_it_has_no_descriptors() -> None:
    r = resolve([], "gpu", [], lambda d: None)
    assert r.chosen is None and r.rejections == ()
    assert "the search path has no descriptors" in r.explain("gpu", [])


def test_rule5_no_match_spells_out_at_most_explain_max_rejections_and_counts_the_rest() -> None:
    ds = [_d(f"{i:02d}-gpu.json") for i in range(EXPLAIN_MAX + 3)]
    r = resolve(ds, "gpu", ["virgl"], lambda d: None)
    text = r.explain("gpu", ["virgl"])
    assert text.count("capabilities not probed yet") == EXPLAIN_MAX, text
    assert "3 more of this type" in text, text


# ================================================================ rule 6: validation


def test_rule6_unknown_type_is_warning_not_rejection(t: Tree) -> None:
    path = t.write("data", "50-sound.json", descriptor("sound", "/usr/bin/vhost-device-sound"))
    result = t.lookup()
    [d] = result.descriptors
    assert (d.name, d.type) == ("50-sound.json", "sound")
    [w] = result.diagnostics
    assert (w.path, w.level) == (str(path), WARNING)
    assert w.message.startswith("/type: 'sound' is not a QEMU vhost-user type"), w


def test_rule6_every_known_type_is_accepted_without_warning() -> None:
    assert "fs" in KNOWN_TYPES and len(KNOWN_TYPES) == 15
    for btype in sorted(KNOWN_TYPES):
        d, diags = parse(descriptor(btype))
        assert d is not None and d.type == btype
        assert diags == (), (btype, diags)


def test_rule6_virtiofsd_extra_features_key_accepted(t: Tree) -> None:
    # Rust virtiofsd's 50-virtiofsd.json, verbatim shape.
    t.write(
        "data",
        "50-virtiofsd.json",
        {
            "description": "virtiofsd vhost-user-fs",
            "type": "fs",
            "binary": "/usr/libexec/virtiofsd",
            "features": ["migrate-precopy", "separate-options"],
        },
    )
    result = t.lookup()
    [d] = result.descriptors
    assert (d.type, d.binary, d.description) == (
        "fs",
        "/usr/libexec/virtiofsd",
        "virtiofsd vhost-user-fs",
    )
    assert result.diagnostics == ()


def test_rule6_unknown_top_level_keys_of_any_shape_are_ignored() -> None:
    d, diags = parse(descriptor(x_vendor={"nested": [1, None, {"a": True}]}, features="not-a-list"))
    assert d is not None and diags == ()


def test_rule6_relative_binary_rejected_with_pointer(t: Tree) -> None:
    path = t.write("data", "50-a.json", descriptor(binary="vhost-user-gpu"))
    result = t.lookup()
    assert names(result) == []
    message = only_error(result.diagnostics, path).message
    assert message == '/binary: must be an absolute path, not "vhost-user-gpu"'


def test_rule6_binary_must_be_a_nonempty_absolute_string() -> None:
    for binary, pointer in [
        ("", "/binary"),
        ("/", "/binary"),
        ("./gpu", "/binary"),
        (7, "/binary"),
    ]:
        d, diags = parse(descriptor(binary=binary))
        assert d is None
        assert [x.message.split(":")[0] for x in diags] == [pointer], (binary, diags)
        assert "; " not in diags[0].message, diags


def test_rule6_missing_type_or_binary_is_rejected_with_pointer() -> None:
    d, diags = parse({"description": "x"})
    assert d is None
    [diag] = diags
    assert sorted(diag.message.split("; ")) == [
        "/: missing required key 'binary'",
        "/: missing required key 'type'",
    ]


def test_rule6_empty_type_is_rejected() -> None:
    d, diags = parse(descriptor(""))
    assert d is None and diags[0].message == "/type: must not be empty"


def test_rule6_description_must_be_a_string() -> None:
    d, diags = parse(descriptor(description=["QEMU"]))
    assert d is None and diags[0].message.startswith("/description: must be a string")


def test_rule6_missing_description_is_a_warning_not_rejection() -> None:
    doc = descriptor()
    del doc["description"]
    d, diags = parse(doc)
    assert d is not None and d.description == ""
    assert [(x.level, x.message) for x in diags] == [(WARNING, "/: missing key 'description'")]


def test_rule6_tags_must_be_a_list_of_strings() -> None:
    d, diags = parse(descriptor(tags="gpu"))
    assert d is None and diags[0].message.startswith("/tags: must be a list")
    d, diags = parse(descriptor(tags=["a", "b"]))
    assert d is not None and d.tags == ("a", "b")


def test_rule6_files_over_1mib_rejected(t: Tree) -> None:
    doc = json.dumps(descriptor()).encode()
    exact = t.write("data", "50-exact.json", doc + b" " * (MAX_DESCRIPTOR_SIZE - len(doc)))
    over = t.write("data", "60-over.json", doc + b" " * (MAX_DESCRIPTOR_SIZE + 1 - len(doc)))
    assert exact.stat().st_size == MAX_DESCRIPTOR_SIZE == 1024 * 1024
    result = t.lookup()
    assert names(result) == ["50-exact.json"]
    assert only_error(result.diagnostics, over).message.startswith("larger than 1048576 bytes")
    # The pure parser draws the same line for bytes it is handed.
    parsed = parse_descriptor(over.read_bytes(), path=str(over), name=over.name, tier="data")
    assert parsed.broken and "larger than 1048576 bytes" in parsed.diagnostics[0].message


def test_rule6_sparse_file_over_1mib_is_rejected(t: Tree) -> None:
    path = t.dir("data") / "50-sparse.json"
    with open(path, "wb") as f:
        f.truncate(2 * MAX_DESCRIPTOR_SIZE)
    parsed, _ = scan.read_candidate(str(path), path.name, "data")
    assert parsed is not None and parsed.broken
    assert "larger than" in parsed.diagnostics[0].message


def test_rule6_file_whose_size_lies_is_still_capped_at_1mib(t: Tree) -> None:
    # procfs files say size 0 and are regular: only the capped read can catch them.
    source = Path("/proc/kallsyms")
    try:
        with open(source, "rb") as f:
            big = len(f.read(MAX_DESCRIPTOR_SIZE + 1)) > MAX_DESCRIPTOR_SIZE
    except OSError as e:
        pytest.skip(
            f"{source} cannot be read here ({e.strerror}): no regular file that lies about its size"
        )
    if not big or source.stat().st_size != 0:
        pytest.skip(f"{source} is not a >1 MiB file reporting size 0 on this kernel")
    link = t.symlink("data", "50-proc.json", source)
    result = t.lookup()
    assert names(result) == []
    assert (
        only_error(result.diagnostics, link).message == f"larger than {MAX_DESCRIPTOR_SIZE} bytes"
    )


# ================================================================ capabilities paragraph


def test_capabilities_defaults_are_5s_timeout_and_64kib_stdout_cap() -> None:
    assert DEFAULT_TIMEOUT == 5.0
    assert STDOUT_CAP == 64 * 1024


def test_capabilities_features_kept_as_is_unknown_included() -> None:
    printed = b'{"type": "fs", "features": ["separate-options", "x-new", "migrate-precopy"]}'
    caps = parse_capabilities(printed, "fs")
    assert isinstance(caps, Capabilities)
    assert caps.features == ("separate-options", "x-new", "migrate-precopy")
    assert json.loads(caps.json) == json.loads(printed)


def test_capabilities_features_may_be_absent() -> None:
    caps = parse_capabilities(b'{"type": "fs"}\n', "fs")
    assert isinstance(caps, Capabilities) and caps.features == ()


def test_capabilities_type_must_equal_descriptor_type() -> None:
    caps = parse_capabilities(b'{"type": "gpu", "features": ["virgl"]}', "input")
    assert isinstance(caps, ProbeError) and caps.code == "type-mismatch"


def test_capabilities_must_be_a_json_object_with_type() -> None:
    for printed, code in [
        (b"", "invalid-json"),
        (b"gpu", "invalid-json"),
        (b"\xff", "invalid-json"),
        (b"[]", "invalid-capabilities"),
        (b"{}", "invalid-capabilities"),
        (b'{"type": "gpu", "features": [1]}', "invalid-capabilities"),
        (b'{"type": "gpu", "features": {"virgl": true}}', "invalid-capabilities"),
    ]:
        caps = parse_capabilities(printed, "gpu")
        assert isinstance(caps, ProbeError) and caps.code == code, (printed, caps)


def test_capabilities_cache_identity_changes_with_the_binary(tmp_path: Path) -> None:
    binary = tmp_path / "backend"
    binary.write_text("#!/bin/sh\n")
    first = binary_identity(str(binary))
    assert binary_identity(str(binary)) == first
    # Replaced atomically by a file of the same size and mtime: a new inode.
    replacement = tmp_path / "backend.new"
    replacement.write_text("#!/bin/sh\n")
    st = binary.stat()
    os.utime(replacement, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(replacement, binary)
    second = binary_identity(str(binary))
    assert second != first and not isinstance(second, ProbeError)
    assert isinstance(binary_identity(str(tmp_path / "gone")), ProbeError)


def test_rule3_symlink_to_dev_null_masks_like_an_empty_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """systemd-style masking: a symlink to /dev/null hides the name, with no error."""
    from vhostuserd.core.lookup import Directory, merge
    from vhostuserd.edges import scan

    data = tmp_path / "data"
    etc = tmp_path / "etc"
    data.mkdir()
    etc.mkdir()
    (data / "50-gpu.json").write_text(
        '{"type": "gpu", "binary": "/usr/bin/true", "description": "d"}'
    )
    (etc / "50-gpu.json").symlink_to("/dev/null")
    result = merge(scan.list_all([Directory("sysconf", str(etc)), Directory("data", str(data))]))
    assert result.descriptors == ()
    assert result.diagnostics == ()
