"""Shared helpers for the lookup, probe and offline-CLI tests: real scripts (their trees are
`busutil.Tree`).

`write_backend` writes a small fake backend whose processes all carry a unique marker, so a
test can prove that none is left behind (`leftover_processes`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers_auth import as_nobody

from vhostuserd.core import lookup
from vhostuserd.core.descriptors import ERROR, Diagnostic


def descriptor(btype: str = "gpu", binary: str = "/usr/bin/true", **extra: Any) -> dict[str, Any]:
    """A valid descriptor document (override or add keys with ``extra``)."""
    doc: dict[str, Any] = {"description": f"test {btype} backend", "type": btype, "binary": binary}
    doc.update(extra)
    return doc


def names(result: lookup.LookupResult) -> list[str]:
    return [d.name for d in result.descriptors]


def errors(diagnostics: Sequence[Diagnostic]) -> list[Diagnostic]:
    return [d for d in diagnostics if d.level == ERROR]


# ---------------------------------------------------------------- fake backends


@dataclass(frozen=True)
class Backend:
    """A fake backend script; every process it starts has ``marker`` in its environment."""

    path: Path
    marker: str
    pidfile: Path

    def recorded_pids(self) -> list[int]:
        """Pids the script wrote down (itself and the children it started)."""
        try:
            text = self.pidfile.read_text()
        except FileNotFoundError:
            return []
        return [int(p) for p in text.split()]


def write_backend(directory: Path, body: str, *, name: str | None = None) -> Backend:
    """Write an executable ``#!/bin/sh`` backend running ``body``.

    The script exports ``VHU_TEST_MARKER`` (inherited by everything it starts) and appends
    its own pid to a pid file; ``body`` may append more with ``echo $! >>"$PIDFILE"``.
    The script's own path also carries the marker, so its command line does too.
    """
    marker = f"vhu-test-{uuid.uuid4().hex}"
    path = directory / (name or f"backend-{marker}")
    pidfile = directory / f"{path.name}.pids"
    path.write_text(
        "#!/bin/sh\n"
        f"VHU_TEST_MARKER={marker}; export VHU_TEST_MARKER\n"
        f"PIDFILE='{pidfile}'\n"
        'echo $$ >>"$PIDFILE"\n'
        f"{body}\n"
    )
    path.chmod(0o755)
    return Backend(path, marker, pidfile)


def capabilities_backend(
    directory: Path, btype: str, features: Sequence[str] | None = None, *, name: str | None = None
) -> Backend:
    """A well-behaved backend whose ``--print-capabilities`` prints type and features."""
    caps: dict[str, Any] = {"type": btype}
    if features is not None:
        caps["features"] = list(features)
    return write_backend(directory, f"echo '{json.dumps(caps)}'", name=name)


def _proc_text(pid: str, what: str) -> bytes:
    try:
        with open(f"/proc/{pid}/{what}", "rb") as f:
            return f.read()
    except OSError:
        return b""


def leftover_processes(backend: Backend) -> list[str]:
    """Processes of ``backend`` still in /proc: alive or zombie, found by marker or recorded pid."""
    found: list[str] = []
    marker = backend.marker.encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        if marker in _proc_text(pid, "cmdline") or marker in _proc_text(pid, "environ"):
            cmdline = _proc_text(pid, "cmdline").replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{pid} {cmdline}")
    for pid in backend.recorded_pids():
        stat = _proc_text(str(pid), "stat")
        if stat:
            state = stat.rsplit(b")", 1)[1].split()[0].decode()
            found.append(f"{pid} (recorded by the script, state {state})")
    return found


def open_fds() -> list[str]:
    """This process's open fds with what they point at."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            continue
    return sorted(out)


# ---------------------------------------------------------------- vhostuserctl


def vhostuserctl_argv() -> list[str]:
    """The installed entry point next to this Python, else the module run by this Python."""
    entry = Path(sys.executable).parent / "vhostuserctl"
    if entry.exists():
        return [str(entry)]
    return [sys.executable, "-c", "from vhostuserd.cli.main import main; main()"]


def run_ctl(
    args: Sequence[str], env: Mapping[str, str], *, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*vhostuserctl_argv(), *args],
        env=dict(env),
        capture_output=True,
        text=True,
        errors="surrogateescape",
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def run_unprivileged(code: str, *, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run a Python snippet where file modes are enforced: as uid/gid 65534 when we are root
    (setpriv), else as ourselves."""
    argv = [sys.executable, "-c", code]
    return subprocess.run(
        as_nobody(*argv) if os.geteuid() == 0 else argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"},
        check=False,
    )
