"""The finish users see: man pages and bash completion are made from the parsers that print
--help, render, and work; --help describes what it takes; the documents refer to nothing
outside the repository; docs/json.md's examples are valid output."""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest
from busutil import (
    REPO,
    VHOSTUSERCTL,
    WAIT,
    Daemon,
    PrivateBus,
    Tree,
    descriptor,
    fake_backend,
    stop_process,
)

from vhostuserd.cli import completion, manpage
from vhostuserd.cli.main import build_parser
from vhostuserd.core.descriptors import KNOWN_TYPES
from vhostuserd.core.optiontable import OPTIONS


@pytest.mark.parametrize("page", sorted(manpage.PAGES))
def test_shipped_man_page_is_generated_from_the_parser(page: str) -> None:
    assert (REPO / "man" / page).read_text() == manpage.PAGES[page](), (
        f"man/{page} is stale: run python -m vhostuserd.cli.manpage man"
    )


@pytest.mark.parametrize("page", sorted(manpage.PAGES))
def test_man_renders_the_page(page: str) -> None:
    if shutil.which("man") is None:
        pytest.skip("man is not installed (Debian package man-db)")
    r = subprocess.run(
        ["man", "--warnings", str(REPO / "man" / page)],
        capture_output=True,
        text=True,
        env={**os.environ, "MANWIDTH": "100", "MANPAGER": "cat", "PAGER": "cat"},
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert "NAME" in r.stdout and "SYNOPSIS" in r.stdout and "OPTIONS" in r.stdout
    assert "warning" not in r.stderr.lower(), r.stderr
    name = page.split(".")[0]
    for option in ("--system", "--address"):
        assert option in r.stdout, f"{option} missing from {page}"
    if name == "vhostuserctl":
        for command in (
            "list",
            "resolve",
            "spawn",
            "backends",
            "stop",
            "monitor",
            "check",
            "status",
            "reload",
        ):
            assert f"\n       {command}" in r.stdout, f"{command} missing from the COMMANDS section"
        assert "check [PATH...]" in r.stdout and "--exec -- CMD" in r.stdout
    else:
        assert "--log-level debug|info|warning|error" in r.stdout, r.stdout
    assert "\nENVIRONMENT\n" in r.stdout and "XDG_DATA_DIRS" in r.stdout.split("\nENVIRONMENT\n")[1]
    see_also = r.stdout.split("\nSEE ALSO\n")[1]
    assert f"{name}(" not in see_also, f"{page} lists itself in SEE ALSO"
    assert "docs/contract.md" in see_also


def test_manpage_help_prints_usage_and_writes_nothing(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "vhostuserd.cli.manpage", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0 and r.stdout.startswith(
        "usage: python -m vhostuserd.cli.manpage DIR"
    ), r
    assert list(tmp_path.iterdir()) == []
    r = subprocess.run(
        [sys.executable, "-m", "vhostuserd.cli.manpage", "--bogus"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 1 and list(tmp_path.iterdir()) == []


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_help_describes_every_positional_the_types_and_the_spawn_options() -> None:
    for name, p in _subparsers().items():
        for action in p._actions:
            if not action.option_strings:
                assert action.help, f"{name} {action.metavar}: no help"
                assert action.metavar in ("TYPE", "NAME", "PATH", "ID"), (name, action.metavar)
    help_of = {name: p.format_help() for name, p in _subparsers().items()}
    for t in ("gpu", "fs", "input", "block"):
        assert t in help_of["resolve"] and t in help_of["list"]
    spawn = " ".join(help_of["spawn"].split())
    assert "--exec -- CMD [ARG...]" in spawn
    for key in OPTIONS:
        if key != "detach":
            assert key in spawn, f"-o {key} is not listed in spawn --help"
    # "offline" is said only by the commands that have --offline.
    for name, text in help_of.items():
        if "--offline" not in text:
            assert "offline" not in text.lower(), f"{name} --help mentions offline:\n{text}"


def test_a_usage_error_prints_the_commands_usage(tree: Tree) -> None:
    for argv, usage in (
        (["spawn", "50-gpu.json", "--exec"], "usage: vhostuserctl spawn NAME"),
        (["stop"], "usage: vhostuserctl stop"),
        (["list", "--offline", "--address", "unix:path=/x"], "usage: vhostuserctl list"),
    ):
        r = subprocess.run(
            [VHOSTUSERCTL, *argv],
            env=tree.env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert r.returncode == 2 and r.stderr.startswith(usage), (argv, r.stderr)


def test_resolve_of_an_unknown_type_says_the_type_is_unknown(tree: Tree) -> None:
    tree.write("data", "50-gpu.json", descriptor("gpu"))
    r = subprocess.run(
        [VHOSTUSERCTL, "resolve", "nonsense", "--offline", "--sysconfdir", str(tree.sysconfdir)],
        env=tree.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 1, r
    assert r.stderr.startswith("vhostuserctl: nonsense: unknown backend type; the types are "), (
        r.stderr
    )
    assert all(t in r.stderr for t in KNOWN_TYPES)


OUTSIDE = re.compile(r"\.\./shared|shared/design|CONTRACT\.md|CONTRACT section|/work/")


def test_nothing_refers_outside_the_repository() -> None:
    texts = {
        p.relative_to(REPO).as_posix(): p.read_text()
        for p in [
            REPO / "README.md",
            *sorted((REPO / "docs").glob("*.md")),
            *sorted((REPO / "man").iterdir()),
        ]
    }
    texts["--help"] = build_parser().format_help() + "".join(
        p.format_help() for p in _subparsers().values()
    )
    texts["pyproject.toml"] = (REPO / "pyproject.toml").read_text()
    for name, text in texts.items():
        assert not OUTSIDE.search(text), (
            f"{name} refers outside the repository: {OUTSIDE.search(text)}"
        )
    # Every document a README or docs page links to is in the repository.
    for name, text in texts.items():
        for target in re.findall(r"\]\(([^)#]+)\)", text):
            if "://" not in target:
                base = REPO / (Path(name).parent if name.endswith(".md") else Path("."))
                assert (base / target).exists(), f"{name} links to {target}, which is not there"


def test_every_example_in_the_json_doc_is_valid_output() -> None:
    schema = json.loads((REPO / "docs" / "vhostuserctl.schema.json").read_text())
    text = (REPO / "docs" / "json.md").read_text()
    examples = re.findall(r"<!-- schema: (\w+) -->\n```json\n(.*?)```", text, re.DOTALL)
    assert {c for c, _ in examples} >= set(schema["$defs"]["command"]) - {"spawn"}
    for command, body in examples:
        validator = jsonschema.Draft202012Validator(
            {"$defs": schema["$defs"], "$ref": f"#/$defs/command/{command}"}
        )
        docs = (
            [json.loads(line) for line in body.splitlines()]
            if command == "monitor"
            else [json.loads(body)]
        )
        for doc in docs:
            validator.validate(doc)


def test_shipped_completion_is_generated_from_the_parser() -> None:
    assert (REPO / "completions" / "vhostuserctl").read_text() == completion.render(), (
        "completions/vhostuserctl is stale: "
        "run python -m vhostuserd.cli.completion > completions/vhostuserctl"
    )


def _complete(words: list[str], env: dict[str, str]) -> list[str]:
    script = (
        f"source {REPO / 'completions' / 'vhostuserctl'}\n"
        f"COMP_WORDS=({' '.join(repr(w) if w else repr('') for w in words)})\n"
        f"COMP_CWORD={len(words) - 1}\n_vhostuserctl\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n"
    )
    r = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, env=env, timeout=60, check=True
    )
    return [w for w in r.stdout.split("\n") if w]


def test_tab_completes_commands_and_descriptor_names(tree: Tree) -> None:
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    tree.write("data", "50-test-gpu.json", descriptor("gpu"))
    tree.write("data", "60-local-fs.json", descriptor("fs"), index=1)
    env = {**tree.env(), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    assert set(_complete(["vhostuserctl", ""], env)) >= {
        "list",
        "show",
        "resolve",
        "spawn",
        "stop",
        "check",
    }
    assert sorted(_complete(["vhostuserctl", "re"], env)) == ["reload", "resolve"]
    assert _complete(["vhostuserctl", "show", ""], env) == ["50-test-gpu.json", "60-local-fs.json"]
    assert _complete(["vhostuserctl", "spawn", "60"], env) == ["60-local-fs.json"]
    assert "--listen" in _complete(["vhostuserctl", "spawn", "60-local-fs.json", "--"], env)
    assert _complete(["vhostuserctl", "--system", "show", "50"], env) == ["50-test-gpu.json"]


def test_tab_completes_types_features_and_option_keys(tree: Tree) -> None:
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    env = {**tree.env(), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    assert set(_complete(["vhostuserctl", "resolve", ""], env)) == set(KNOWN_TYPES)
    assert _complete(["vhostuserctl", "list", "--type", "in"], env) == ["input"]
    assert _complete(["vhostuserctl", "resolve", "gpu", "--feature", "vi"], env) == ["virgl"]
    assert _complete(["vhostuserctl", "resolve", "fs", "-f", "sep"], env) == ["separate-options"]
    assert _complete(["vhostuserctl", "spawn", "50-gpu.json", "-o", "render"], env) == [
        "render-node="
    ]
    assert _complete(["vhostuserctl", "spawn", "50-gpu.json", "-o", "vir"], env) == ["virgl"]
    # An empty result and the table's footnote are not descriptor names.
    assert _complete(["vhostuserctl", "show", ""], env) == []
    tree.write("data", "50-test-gpu.json", descriptor("gpu"))
    assert _complete(["vhostuserctl", "show", ""], env) == ["50-test-gpu.json"]


def test_the_readme_python_snippet_runs_as_pasted(
    bus: PrivateBus, tree: Tree, start_daemon: Callable[..., Daemon]
) -> None:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.DOTALL)
    assert len(blocks) == 1, "the README's Python example"
    gpu = fake_backend(tree.root / "gpu-backend", "gpu", ["virgl"])
    tree.write("data", "50-gpu.json", descriptor("gpu", gpu))
    start_daemon()
    script = tree.root / "snippet.py"
    script.write_text(blocks[0])
    env = {**tree.env(), "DBUS_SESSION_BUS_ADDRESS": bus.address}
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    try:
        first = _line_within(proc, WAIT)
        assert first == f"50-gpu.json {gpu} ('virgl',)\n", (
            first,
            proc.stderr.read() if proc.poll() is not None and proc.stderr else "",
        )
        # The snippet subscribes to the events only after it printed: a change made before
        # its subscription reaches the bus is not told to it. Make changes until one is.
        line = ""
        for i in range(int(WAIT)):
            tree.write("sysconf", f"60-new-{i}.json", descriptor("input"))
            line = _line_within(proc, 1.0)
            if line:
                break
        assert "'event': 'descriptor-added'" in line or "'event': 'index-changed'" in line, line
    finally:
        stop_process(proc)


def _line_within(proc: subprocess.Popen[str], seconds: float) -> str:
    """The next line ``proc`` prints within ``seconds``, or "" (never blocks longer)."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], seconds)
    return proc.stdout.readline() if ready else ""


def test_the_unit_comment_on_no_new_privileges_says_what_the_code_does() -> None:
    from vhostuserd.edges.trust import run_as

    unit = (REPO / "systemd" / "vhostuserd.service").read_text()
    block = re.search(r"^#   NoNewPrivileges=(.*?)\n#   [A-Z]", unit, re.MULTILINE | re.DOTALL)
    assert block, "no comment explains NoNewPrivileges="
    comment = " ".join(line.lstrip("# ").strip() for line in block.group(1).splitlines())
    assert "setpriv --no-new-privs" in comment and "root callers' backends included" in comment, (
        comment
    )
    for uid in (0, 65534):  # every system-mode backend gets no_new_privs, as the comment says
        run = run_as(uid, system=True)
        assert run.no_new_privs and "--no-new-privs" in run.exec_prefix(), (uid, run)


def test_the_package_ships_its_licence_changelog_and_type_marker() -> None:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["license"] == {"text": "MIT"}
    assert (REPO / "LICENSE").read_text().startswith("MIT License\n")
    assert (REPO / "CHANGELOG.md").read_text().startswith("# Changelog\n")
    assert (REPO / "vhostuserd" / "py.typed").exists()
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["vhostuserd"]


def test_the_documented_linger_of_an_exited_backend_is_the_daemons() -> None:
    from vhostuserd.bus.backends import LINGER_S

    said = f"{LINGER_S:g} seconds"
    assert said in (REPO / "docs" / "contract.md").read_text()
    assert said in (REPO / "README.md").read_text()
    assert said in build_parser().format_help() + "".join(
        p.format_help() for p in _subparsers().values()
    )


def test_every_source_file_the_docs_name_exists() -> None:
    """README.md and docs/ name modules by path (`vhostuserd/edges/userns.py`); a move must
    take them along."""
    named = set()
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        named |= {(doc.name, m) for m in re.findall(r"\bvhostuserd/[\w/]+\.py\b", doc.read_text())}
    missing = sorted(f"{doc}: {path}" for doc, path in named if not (REPO / path).is_file())
    assert named and not missing, missing


def test_the_architecture_names_only_modules_that_exist() -> None:
    """docs/architecture.md's table lists each package's modules (`descriptors`, `watch`, ...):
    each is a module of that package, or one of the top-level modules it mentions."""
    text = (REPO / "docs" / "architecture.md").read_text()
    top = {p.stem for p in (REPO / "vhostuserd").glob("*.py")}
    rows = re.findall(r"^\| `vhostuserd/(\w+)/` \| (.*?) \|", text, re.M)
    assert {pkg for pkg, _ in rows} == {"core", "edges", "bus", "cli"}, rows
    wrong = []
    for pkg, cell in rows:
        here = {p.stem for p in (REPO / "vhostuserd" / pkg).glob("*.py")}
        for name in re.findall(r"`([a-z_]+)`", cell):
            if name not in here | top:
                wrong.append(f"{pkg}/{name}")
    assert not wrong, wrong
    for pkg in ("core", "edges", "bus", "cli"):
        listed = {n for p, cell in rows if p == pkg for n in re.findall(r"`([a-z_]+)`", cell)}
        unlisted = {
            p.stem for p in (REPO / "vhostuserd" / pkg).glob("*.py") if p.stem != "__init__"
        } - listed
        assert not unlisted, f"docs/architecture.md does not list {pkg}: {sorted(unlisted)}"
