"""``vhostuserctl ... --offline`` and ``vhostuserctl check`` as real subprocesses
(docs/contract.md section 4).

Every run gets an isolated environment: XDG_DATA_DIRS, XDG_CONFIG_HOME and HOME point into
the test's tree and --sysconfdir at its scratch sysconf root, so the machine's own
descriptors never leak in. Backends are small fake scripts written by the test.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from busutil import Tree
from helpers_lookup import capabilities_backend, descriptor, run_ctl, write_backend

from vhostuserd.cli.output import EXIT_FAILED, EXIT_OK, EXIT_USAGE

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


class Ctl:
    """Runs vhostuserctl against one tree."""

    def __init__(self, tree: Tree) -> None:
        self.tree = tree

    def __call__(self, *args: str, offline: bool = True) -> subprocess.CompletedProcess[str]:
        argv = list(args)
        if offline:
            argv += ["--offline", "--sysconfdir", str(self.tree.sysconfdir)]
        return run_ctl(argv, self.tree.env())

    def check(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_ctl(["check", *args, "--sysconfdir", str(self.tree.sysconfdir)], self.tree.env())


@pytest.fixture
def t(tmp_path: Path) -> Tree:
    return Tree(tmp_path, data_count=2)


@pytest.fixture
def ctl(t: Tree) -> Ctl:
    return Ctl(t)


@pytest.fixture
def populated(t: Tree) -> Tree:
    """gpu (two, one with virgl), fs and input backends spread over every tier."""
    bindir = t.root / "bin"
    bindir.mkdir()
    gpu_plain = capabilities_backend(bindir, "gpu", ["render-node"], name="gpu-plain")
    gpu_virgl = capabilities_backend(bindir, "gpu", ["render-node", "virgl"], name="gpu-virgl")
    fs = capabilities_backend(
        bindir, "fs", ["separate-options", "migrate-precopy"], name="virtiofsd"
    )
    t.write(
        "data", "50-qemu-gpu.json", descriptor("gpu", str(gpu_plain.path), tags=["qemu"]), index=1
    )
    t.write("data", "60-virgl-gpu.json", descriptor("gpu", str(gpu_virgl.path)), index=0)
    t.write(
        "data", "50-virtiofsd.json", descriptor("fs", str(fs.path), features=["separate-options"])
    )
    t.write("sysconf", "70-input.json", descriptor("input", "/usr/libexec/vhost-user-input"))
    t.write("user", "80-user-gpu.json", descriptor("gpu", str(gpu_virgl.path)))
    return t


def table_columns(text: str) -> list[list[str]]:
    """Split an aligned table into cells at the header's column starts, checking alignment."""
    lines = text.rstrip("\n").split("\n\n")[0].split("\n")  # the table, less its footnote
    header = lines[0]
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    rows = []
    for line in lines:
        cells = []
        for i, start in enumerate(starts):
            end = starts[i + 1] if i + 1 < len(starts) else len(line)
            cell = line[start:end]
            assert start == 0 or line[start - 1] == " ", f"column {i} misaligned in {line!r}"
            assert not cell.startswith(" ") or cell.strip() == "", (
                f"column {i} misaligned in {line!r}"
            )
            cells.append(cell.strip())
        rows.append(cells)
    return rows


# ---------------------------------------------------------------- list


def test_list_offline_prints_an_aligned_table_in_priority_order(populated: Tree, ctl: Ctl) -> None:
    proc = ctl("list")
    assert proc.returncode == EXIT_OK, proc.stderr
    rows = table_columns(proc.stdout)
    assert rows[0] == ["NAME", "TYPE", "TIER", "BINARY", "FEATURES"]
    assert [(r[0], r[1], r[2]) for r in rows[1:]] == [
        ("50-qemu-gpu.json", "gpu", "data"),
        ("50-virtiofsd.json", "fs", "data"),
        ("60-virgl-gpu.json", "gpu", "data"),
        ("70-input.json", "input", "sysconf"),
        ("80-user-gpu.json", "gpu", "user"),
    ]
    assert rows[1][3] == str(populated.root / "bin/gpu-plain")
    assert proc.stderr == ""


def test_list_offline_json_has_the_dbus_keys(populated: Tree, ctl: Ctl) -> None:
    proc = ctl("--json", "list")
    assert proc.returncode == EXIT_OK, proc.stderr
    items = json.loads(proc.stdout)
    assert [i["name"] for i in items] == [
        "50-qemu-gpu.json",
        "50-virtiofsd.json",
        "60-virgl-gpu.json",
        "70-input.json",
        "80-user-gpu.json",
    ]
    for item in items:
        assert set(item) == DICT_KEYS, item
        assert (item["probed"], item["features"], item["probe_error"], item["object"]) == (
            False,
            None,
            None,
            None,
        )
    first = items[0]
    assert first["path"] == str(populated.dir("data", 1) / "50-qemu-gpu.json")
    assert (first["tier"], first["type"], first["tags"]) == ("data", "gpu", ["qemu"])
    assert first["description"] == "test gpu backend"


def test_list_offline_type_filter(populated: Tree, ctl: Ctl) -> None:
    proc = ctl("--json", "list", "--type", "gpu")
    assert [i["name"] for i in json.loads(proc.stdout)] == [
        "50-qemu-gpu.json",
        "60-virgl-gpu.json",
        "80-user-gpu.json",
    ]
    proc = ctl("list", "--type", "scsi")
    assert proc.returncode == EXIT_OK
    assert proc.stdout == "no descriptors\n"


def test_list_offline_system_excludes_the_user_tier(populated: Tree, ctl: Ctl) -> None:
    populated.write("user", "50-qemu-gpu.json", descriptor("gpu", "/home/u/evil"))
    for argv in (["--system", "--json", "list"], ["--json", "list", "--system"]):
        items = json.loads(ctl(*argv).stdout)
        assert "user" not in {i["tier"] for i in items}, argv
        assert [i["name"] for i in items][-1] == "70-input.json"
        assert items[0]["binary"] == str(populated.root / "bin/gpu-plain")
    user_mode = json.loads(ctl("--json", "list").stdout)
    assert user_mode[0]["binary"] == "/home/u/evil"


def test_list_offline_prints_diagnostics_on_stderr_and_still_succeeds(t: Tree, ctl: Ctl) -> None:
    t.write("data", "50-ok.json", descriptor())
    broken = t.write("sysconf", "60-broken.json", descriptor(binary="relative"))
    odd = t.write("data", "70-odd.json", descriptor("sound"))
    proc = ctl("list")
    assert proc.returncode == EXIT_OK
    assert [r[0] for r in table_columns(proc.stdout)[1:]] == ["50-ok.json", "70-odd.json"]
    assert f"{broken}: error: /binary: must be an absolute path" in proc.stderr
    assert f"{odd}: warning: /type: 'sound'" in proc.stderr


def test_list_offline_sees_nothing_outside_its_environment(t: Tree, ctl: Ctl) -> None:
    proc = ctl("--json", "list")
    assert proc.returncode == EXIT_OK, proc.stderr
    assert json.loads(proc.stdout) == []


# ---------------------------------------------------------------- show


def test_show_offline_probes_and_prints_every_key(populated: Tree, ctl: Ctl) -> None:
    proc = ctl("show", "60-virgl-gpu.json")
    assert proc.returncode == EXIT_OK, proc.stderr
    fields = dict(
        line.split(None, 1) if " " in line else (line, "") for line in proc.stdout.splitlines()
    )
    assert fields["name:"] == "60-virgl-gpu.json"
    assert fields["tier:"] == "data"
    assert fields["features:"] == "render-node, virgl"
    values_start = {
        line.index(v)
        for line, v in (
            (line, line.split(None, 1)[1]) for line in proc.stdout.splitlines() if " " in line
        )
    }
    assert len(values_start) == 1, f"values not aligned:\n{proc.stdout}"


def test_show_offline_json_includes_probed_features(populated: Tree, ctl: Ctl) -> None:
    item = json.loads(ctl("--json", "show", "50-virtiofsd.json").stdout)
    assert set(item) == DICT_KEYS and item["probed"] is True and item["probe_error"] is None
    assert item["features"] == ["separate-options", "migrate-precopy"]


def test_show_offline_reports_a_failed_probe_as_probe_error(t: Tree, ctl: Ctl) -> None:
    bad = write_backend(t.root, "echo oops >&2; exit 4")
    t.write("data", "50-bad.json", descriptor("gpu", str(bad.path)))
    proc = ctl("--json", "show", "50-bad.json")
    assert proc.returncode == EXIT_OK, proc.stderr
    item = json.loads(proc.stdout)
    assert item["features"] is None and item["probed"] is True
    assert item["probe_error"].startswith("exit-status: ") and "oops" in item["probe_error"]


def test_show_offline_unknown_name_fails_with_exit_1(populated: Tree, ctl: Ctl) -> None:
    proc = ctl("show", "99-nothing.json")
    assert proc.returncode == EXIT_FAILED
    assert proc.stdout == ""
    assert "99-nothing.json" in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_show_offline_masked_name_is_not_found(populated: Tree, ctl: Ctl) -> None:
    populated.write("sysconf", "50-qemu-gpu.json", b"")
    assert ctl("show", "50-qemu-gpu.json").returncode == EXIT_FAILED


# ---------------------------------------------------------------- resolve


def test_resolve_offline_prints_the_first_match(populated: Tree, ctl: Ctl) -> None:
    proc = ctl("resolve", "gpu")
    assert (proc.returncode, proc.stdout) == (EXIT_OK, "50-qemu-gpu.json\n"), proc.stderr
    proc = ctl("resolve", "gpu", "--feature", "virgl")
    assert (proc.returncode, proc.stdout) == (EXIT_OK, "60-virgl-gpu.json\n"), proc.stderr
    proc = ctl("resolve", "fs", "-f", "separate-options", "-f", "migrate-precopy")
    assert (proc.returncode, proc.stdout) == (EXIT_OK, "50-virtiofsd.json\n"), proc.stderr


def test_resolve_offline_json_is_the_chosen_descriptor_dict(populated: Tree, ctl: Ctl) -> None:
    item = json.loads(ctl("--json", "resolve", "gpu", "--feature", "virgl").stdout)
    assert item["name"] == "60-virgl-gpu.json"
    assert set(item) == DICT_KEYS
    assert item["features"] == ["render-node", "virgl"]


def test_resolve_offline_no_match_exits_1_with_every_reason(populated: Tree, ctl: Ctl) -> None:
    proc = ctl("resolve", "gpu", "--feature", "x-teleport")
    assert proc.returncode == EXIT_FAILED
    assert proc.stdout == ""
    for name in ("50-qemu-gpu.json", "60-virgl-gpu.json", "80-user-gpu.json"):
        assert f"{name}: feature missing: x-teleport" in proc.stderr, proc.stderr
    proc = ctl("resolve", "scsi")
    assert proc.returncode == EXIT_FAILED and "scsi" in proc.stderr


def test_resolve_offline_skips_backends_whose_probe_fails(t: Tree, ctl: Ctl) -> None:
    good = capabilities_backend(t.root, "gpu", ["virgl"], name="good")
    t.write("data", "10-missing.json", descriptor("gpu", str(t.root / "no-such-binary")))
    t.write(
        "data",
        "20-wrong-type.json",
        descriptor("gpu", str(capabilities_backend(t.root, "input", ["virgl"], name="input").path)),
    )
    t.write("data", "30-good.json", descriptor("gpu", str(good.path)))
    proc = ctl("resolve", "gpu", "--feature", "virgl")
    assert (proc.returncode, proc.stdout) == (EXIT_OK, "30-good.json\n"), proc.stderr


# ---------------------------------------------------------------- capabilities


def test_capabilities_offline_prints_the_backend_json(populated: Tree, ctl: Ctl) -> None:
    proc = ctl("capabilities", "50-virtiofsd.json")
    assert proc.returncode == EXIT_OK, proc.stderr
    assert json.loads(proc.stdout) == {
        "type": "fs",
        "features": ["separate-options", "migrate-precopy"],
    }
    as_json = ctl("--json", "capabilities", "50-virtiofsd.json")
    assert as_json.stdout == proc.stdout  # indented like every other --json output


def test_capabilities_offline_failed_probe_exits_1_naming_the_reason(t: Tree, ctl: Ctl) -> None:
    liar = capabilities_backend(t.root, "input", name="liar")
    t.write("data", "50-liar.json", descriptor("gpu", str(liar.path)))
    proc = ctl("capabilities", "50-liar.json")
    assert proc.returncode == EXIT_FAILED
    assert proc.stdout == ""
    assert "50-liar.json" in proc.stderr and "type-mismatch" in proc.stderr


def test_capabilities_offline_unknown_name_exits_1(populated: Tree, ctl: Ctl) -> None:
    assert ctl("capabilities", "nope.json").returncode == EXIT_FAILED


# ---------------------------------------------------------------- usage


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["list", "--offline", "--bogus"],
        ["show", "--offline"],
        ["resolve", "--offline"],
        ["--system", "--user", "list", "--offline"],
        ["check", "--probe=yes"],
    ],
)
def test_bad_usage_exits_2(t: Tree, argv: list[str]) -> None:
    proc = run_ctl(argv, t.env())
    assert proc.returncode == EXIT_USAGE, (argv, proc.stdout, proc.stderr)
    assert "usage:" in proc.stderr
    assert proc.stdout == ""


# ---------------------------------------------------------------- check


def test_check_valid_search_path_exits_0(populated: Tree, ctl: Ctl) -> None:
    proc = ctl.check()
    assert proc.returncode == EXIT_OK, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert f"{populated.dir('data', 0) / '50-virtiofsd.json'}: ok" in lines
    assert len(lines) == 5


def test_check_prints_every_diagnostic_and_exits_1_on_any_error(t: Tree, ctl: Ctl) -> None:
    t.write("data", "10-ok.json", descriptor())
    rel = t.write("data", "20-relative.json", descriptor(binary="gpu"))
    sound = t.write("data", "30-sound.json", descriptor("sound"))
    shadowed = t.write("data", "40-shadowed.json", b"{broken", index=1)
    t.write("data", "40-shadowed.json", descriptor(), index=0)
    dangling = t.symlink("sysconf", "50-dangling.json", t.root / "gone")
    tags = t.write("user", "60-tags.json", descriptor(tags=[1]))
    mask = t.write("user", "70-mask.json", b"")
    proc = ctl.check()
    assert proc.returncode == EXIT_FAILED
    out = proc.stdout
    assert f"{rel}: error: /binary: must be an absolute path" in out
    assert f"{sound}: warning: /type: 'sound'" in out
    assert f"{shadowed}: error: not valid JSON" in out and "(shadowed by" in out
    assert f"{dangling}: error: dangling symlink" in out
    assert f"{tags}: error: /tags/0: must be a string" in out
    assert f"{mask}: masked" in out


def test_check_warnings_alone_exit_0(t: Tree, ctl: Ctl) -> None:
    t.write("data", "30-sound.json", descriptor("sound"))
    proc = ctl.check()
    assert proc.returncode == EXIT_OK
    assert "warning: /type: 'sound'" in proc.stdout


def test_check_explicit_paths(t: Tree, ctl: Ctl) -> None:
    good = t.root / "good.json"
    good.write_text(json.dumps(descriptor()))
    bad = t.root / "bad.json"
    bad.write_bytes(b'{"type": "gpu", "binary": "/x", "description": "\xff"}')
    proc = ctl.check(str(good))
    assert (proc.returncode, proc.stdout) == (EXIT_OK, f"{good}: ok\n")
    proc = ctl.check(str(good), str(bad), str(t.root / "missing.json"), str(t.root))
    assert proc.returncode == EXIT_FAILED
    assert f"{bad}: error: not valid UTF-8" in proc.stdout
    assert f"{t.root / 'missing.json'}: error: does not exist" in proc.stdout
    assert f"{t.root}: error: is a directory" in proc.stdout


def test_check_json_report(t: Tree, ctl: Ctl) -> None:
    t.write("data", "10-ok.json", descriptor())
    bad = t.write("sysconf", "10-ok.json", b"[]")
    proc = ctl.check("--json")
    assert proc.returncode == EXIT_FAILED
    report = json.loads(proc.stdout)
    assert report["ok"] is False
    by_path = {f["path"]: f for f in report["files"]}
    assert by_path[str(bad)]["status"] == "error"
    assert by_path[str(bad)]["diagnostics"] == [
        {"path": str(bad), "level": "error", "message": "/: must be a JSON object"}
    ]
    assert by_path[str(bad)]["shadowed_by"] is None
    shadowed = by_path[str(t.dir("data", 0) / "10-ok.json")]
    assert (shadowed["status"], shadowed["shadowed_by"]) == ("ok", str(bad))


def test_check_probe_reports_probe_failures_as_errors(t: Tree, ctl: Ctl) -> None:
    good = capabilities_backend(t.root, "gpu", ["virgl"], name="good")
    bad = write_backend(t.root, 'echo \'{"type": "gpu"\'', name="bad")
    t.write("data", "10-good.json", descriptor("gpu", str(good.path)))
    broken = t.write("data", "20-bad.json", descriptor("gpu", str(bad.path)))
    assert ctl.check().returncode == EXIT_OK, "without --probe nothing is run"
    assert not bad.recorded_pids()
    proc = ctl.check("--probe")
    assert proc.returncode == EXIT_FAILED
    assert f"{broken}: error: probe failed: invalid-json" in proc.stdout
    assert f"{t.dir('data', 0) / '10-good.json'}: ok" in proc.stdout


def test_check_empty_search_path_says_so(t: Tree, ctl: Ctl) -> None:
    proc = ctl.check()
    assert (proc.returncode, proc.stdout) == (EXIT_OK, "no descriptor files found\n")


def test_check_system_skips_the_user_tier(t: Tree, ctl: Ctl) -> None:
    t.write("user", "10-bad.json", b"{")
    assert ctl.check().returncode == EXIT_FAILED
    proc = run_ctl(["--system", "check", "--sysconfdir", str(t.sysconfdir)], t.env())
    assert (proc.returncode, proc.stdout) == (EXIT_OK, "no descriptor files found\n")
