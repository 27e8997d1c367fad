"""The finish users see: man pages and bash completion are made from the parsers that print
--help, render, and work."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from busutil import REPO, Tree, descriptor

from vhostuserd import completion, manpage


@pytest.mark.parametrize("page", sorted(manpage.PAGES))
def test_shipped_man_page_is_generated_from_the_parser(page: str) -> None:
    assert (REPO / "man" / page).read_text() == manpage.PAGES[page](), \
        f"man/{page} is stale: run python -m vhostuserd.manpage man"


@pytest.mark.parametrize("page", sorted(manpage.PAGES))
def test_man_renders_the_page(page: str) -> None:
    if shutil.which("man") is None:
        pytest.skip("man is not installed (Debian package man-db)")
    r = subprocess.run(["man", "--warnings", str(REPO / "man" / page)], capture_output=True, text=True,
                       env={**os.environ, "MANWIDTH": "100", "MANPAGER": "cat", "PAGER": "cat"},
                       timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert "NAME" in r.stdout and "SYNOPSIS" in r.stdout and "OPTIONS" in r.stdout
    assert "warning" not in r.stderr.lower(), r.stderr
    name = page.split(".")[0]
    for option in ("--system", "--address"):
        assert option in r.stdout, f"{option} missing from {page}"
    if name == "vhostuserctl":
        for command in ("list", "resolve", "spawn", "backends", "stop", "monitor", "check"):
            assert f"\n       {command}" in r.stdout, f"{command} missing from the COMMANDS section"


def test_shipped_completion_is_generated_from_the_parser() -> None:
    assert (REPO / "completions" / "vhostuserctl").read_text() == completion.render(), \
        "completions/vhostuserctl is stale: run python -m vhostuserd.completion > completions/vhostuserctl"


def _complete(words: list[str], env: dict[str, str]) -> list[str]:
    script = (f"source {REPO / 'completions' / 'vhostuserctl'}\n"
              f"COMP_WORDS=({' '.join(repr(w) if w else repr('') for w in words)})\n"
              f"COMP_CWORD={len(words) - 1}\n_vhostuserctl\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n")
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=60, check=True)
    return [w for w in r.stdout.split("\n") if w]


def test_tab_completes_commands_and_descriptor_names(tree: Tree) -> None:
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    tree.write("data", "50-test-gpu.json", descriptor("gpu"))
    tree.write("data", "60-local-fs.json", descriptor("fs"), i=1)
    env = {**tree.env(), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    assert set(_complete(["vhostuserctl", ""], env)) >= {"list", "show", "resolve", "spawn", "stop", "check"}
    assert _complete(["vhostuserctl", "re"], env) == ["resolve"]
    assert _complete(["vhostuserctl", "show", ""], env) == ["50-test-gpu.json", "60-local-fs.json"]
    assert _complete(["vhostuserctl", "spawn", "60"], env) == ["60-local-fs.json"]
    assert "--listen" in _complete(["vhostuserctl", "spawn", "60-local-fs.json", "--"], env)
    assert _complete(["vhostuserctl", "--system", "show", "50"], env) == ["50-test-gpu.json"]
