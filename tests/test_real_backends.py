"""The lookup and the probe against the real Debian backends (installed by scripts/setup).

qemu-system-gui ships /usr/share/qemu/vhost-user/50-qemu-gpu.json and qemu-system-common
50-qemu-virtiofsd.json. Without them these tests are skipped, saying which file is missing.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from helpers_lookup import run_ctl

from vhostuserd.core import lookup
from vhostuserd.core.descriptors import Capabilities, Descriptor, ProbeResult
from vhostuserd.edges import procs, scan
from vhostuserd.edges.probe import ProbeCache

REAL_DIR = Path("/usr/share/qemu/vhost-user")
GPU = REAL_DIR / "50-qemu-gpu.json"
VIRTIOFSD = REAL_DIR / "50-qemu-virtiofsd.json"


def require(path: Path) -> None:
    if not path.is_file():
        pytest.skip(f"{path} is not installed (scripts/setup installs the Debian QEMU packages)")
    binary = json.loads(path.read_text()).get("binary", "")
    if not os.access(binary, os.X_OK):
        pytest.skip(f"{path} names {binary!r}, which is not an executable here")


def real_lookup(tmp_path: Path) -> lookup.LookupResult:
    """The search path with XDG_DATA_DIRS=/usr/share and scratch sysconf and user tiers."""
    dirs = lookup.search_path(
        system=False,
        sysconfdir=str(tmp_path / "etc"),
        xdg_data_dirs="/usr/share",
        xdg_config_home=None,
        home=str(tmp_path / "home"),
    )
    return lookup.merge(scan.list_all(dirs))


def probe(d: Descriptor) -> ProbeResult:
    async def main() -> ProbeResult:
        reaper = procs.Reaper(asyncio.get_running_loop())
        reaper.install()
        try:
            return await ProbeCache(reaper, 5.0).get(d.binary, d.type)
        finally:
            reaper.uninstall()

    return asyncio.run(main())


def test_real_descriptors_are_valid_and_listed(tmp_path: Path) -> None:
    require(GPU)
    require(VIRTIOFSD)
    result = real_lookup(tmp_path)
    by_name = {d.name: d for d in result.descriptors}
    assert by_name["50-qemu-gpu.json"].path == str(GPU)
    assert by_name["50-qemu-virtiofsd.json"].path == str(VIRTIOFSD)
    assert {d.path for d in result.diagnostics}.isdisjoint({str(GPU), str(VIRTIOFSD)}), (
        result.diagnostics
    )


def test_real_virtiofsd_probe_gives_type_fs(tmp_path: Path) -> None:
    require(VIRTIOFSD)
    d = real_lookup(tmp_path).by_name(VIRTIOFSD.name)
    assert d is not None and d.type == "fs"
    caps = probe(d)
    assert isinstance(caps, Capabilities), caps
    assert caps.type == "fs"


def test_real_gpu_probe_gives_render_node_and_virgl(tmp_path: Path) -> None:
    require(GPU)
    d = real_lookup(tmp_path).by_name(GPU.name)
    assert d is not None and d.type == "gpu"
    caps = probe(d)
    assert isinstance(caps, Capabilities), caps
    assert caps.type == "gpu"
    assert {"render-node", "virgl"} <= set(caps.features), caps.features


def test_real_vhostuserctl_resolve_gpu_virgl_offline_picks_50_qemu_gpu(tmp_path: Path) -> None:
    require(GPU)
    home = tmp_path / "home"
    home.mkdir()
    env = {
        "PATH": "/usr/bin:/bin",
        "LC_ALL": "C.UTF-8",
        "HOME": str(home),
        "XDG_DATA_DIRS": "/usr/share",
    }
    proc = run_ctl(
        [
            "resolve",
            "gpu",
            "--feature",
            "virgl",
            "--offline",
            "--sysconfdir",
            str(tmp_path / "etc"),
        ],
        env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "50-qemu-gpu.json\n"
    proc = run_ctl(
        [
            "--json",
            "resolve",
            "gpu",
            "-f",
            "virgl",
            "-f",
            "render-node",
            "--offline",
            "--sysconfdir",
            str(tmp_path / "etc"),
        ],
        env,
    )
    assert proc.returncode == 0, proc.stderr
    chosen = json.loads(proc.stdout)
    assert (chosen["name"], chosen["path"], chosen["tier"]) == (
        "50-qemu-gpu.json",
        str(GPU),
        "data",
    )
    assert {"virgl", "render-node"} <= set(chosen["features"])


def test_real_vhostuserctl_resolve_fs_with_missing_feature_says_why(tmp_path: Path) -> None:
    require(VIRTIOFSD)
    home = tmp_path / "home"
    home.mkdir()
    env = {
        "PATH": "/usr/bin:/bin",
        "LC_ALL": "C.UTF-8",
        "HOME": str(home),
        "XDG_DATA_DIRS": "/usr/share",
    }
    proc = run_ctl(
        [
            "resolve",
            "fs",
            "--feature",
            "x-no-such-feature",
            "--offline",
            "--sysconfdir",
            str(tmp_path / "etc"),
        ],
        env,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "50-qemu-virtiofsd.json: feature missing: x-no-such-feature" in proc.stderr, proc.stderr
