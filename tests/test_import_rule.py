"""The import rule of docs/architecture.md holds for the package, and `scripts/import-rule`
(run by `scripts/test` before any test) fails on each kind of import that breaks it: a copy
of the package is given one bad import at a time."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RULE = REPO / "scripts" / "import-rule"


def run_rule(package: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(RULE), str(package)], capture_output=True, text=True, check=False
    )


def test_the_package_keeps_the_import_rule() -> None:
    r = run_rule(REPO / "vhostuserd")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    ("module", "line", "said"),
    [
        ("core/resolve.py", "import os", "core imports os (no I/O in core)"),
        ("core/lookup.py", "import asyncio", "core imports asyncio"),
        ("core/options.py", "from dbus_fast import Variant", "core imports dbus_fast"),
        ("core/index.py", "from vhostuserd.edges import scan", "core imports vhostuserd.edges"),
        ("edges/scan.py", "from vhostuserd.bus import connection", "edges imports vhostuserd.bus"),
        ("edges/procs.py", "from vhostuserd import client", "edges imports vhostuserd.client"),
        ("cli/output.py", "from vhostuserd.edges import procs", "cli imports vhostuserd.edges"),
        ("cli/online.py", "from vhostuserd.bus import manager", "cli imports vhostuserd.bus"),
        (
            "client.py",
            "from vhostuserd.edges.scan import list_all",
            "client imports vhostuserd.edges",
        ),
        ("local.py", "from vhostuserd.bus.connection import Bus", "local imports vhostuserd.bus"),
        # inside a function, and under TYPE_CHECKING, count as well
        (
            "cli/main.py",
            "def f():\n    from vhostuserd import daemon",
            "cli imports vhostuserd.daemon",
        ),
        (
            "client.py",
            "if TYPE_CHECKING:\n    import vhostuserd.bus.backends",
            "client imports vhostuserd.bus",
        ),
        # a cycle, even inside one package
        ("core/descriptors.py", "from vhostuserd.core import options", "import cycle:"),
    ],
)
def test_a_bad_import_fails_the_rule_naming_file_and_line(
    tmp_path: Path, module: str, line: str, said: str
) -> None:
    package = tmp_path / "vhostuserd"
    shutil.copytree(REPO / "vhostuserd", package, ignore=shutil.ignore_patterns("__pycache__"))
    target = package / module
    target.write_text(target.read_text() + "\n\n" + line + "\n")
    r = run_rule(package)
    assert r.returncode == 1, r.stderr
    assert said in r.stderr, r.stderr
    if "cycle" not in said:
        assert f"vhostuserd/{module}:" in r.stderr, r.stderr
