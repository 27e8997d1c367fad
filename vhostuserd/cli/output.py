"""What ``vhostuserctl`` prints: aligned tables for people, the JSON of docs/json.md for
scripts, and errors on one line (``{"error": NAME, "message": ...}`` under ``--json``)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from vhostuserd.core.errors import Err
from vhostuserd.core.names import ERROR_PREFIX

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


# The name of the CLI's own failures (a command not found, say): none of the service's errors.
FAILED = ERROR_PREFIX + "Failed"


class Failure(Exception):
    """A request that failed; the message is printed on one line to stderr (under ``--json``,
    as ``{"error": NAME, "message": MESSAGE}``). ``name`` is one of the service's errors, or
    the D-Bus error name the broker answered with; default FAILED."""

    def __init__(self, message: str, name: Err | str = FAILED) -> None:
        super().__init__(message)
        self.name = name.dbus_name if isinstance(name, Err) else name


def print_error(message: str, name: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"error": name, "message": message}, sort_keys=True), file=sys.stderr)
    else:
        print(f"vhostuserctl: {message}", file=sys.stderr)


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    all_rows = [list(header)] + [list(r) for r in rows]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in all_rows
    ]
    return "\n".join(lines)


def print_json(value: Any, *, lines: bool = False) -> None:
    """JSON on stdout: indented, keys sorted; ``lines``: one compact object per line (monitor)."""
    if lines:
        print(json.dumps(value, sort_keys=True), flush=True)
    else:
        print(json.dumps(value, indent=2, sort_keys=True))


NOT_PROBED, NO_FEATURES, PROBE_FAILED = "-", "(none)", "probe failed"
FEATURES_FOOTNOTE = (
    f"FEATURES: {NOT_PROBED} not probed yet (show NAME probes it), "
    f"{NO_FEATURES} probed: no features, {PROBE_FAILED}: see show NAME"
)


def _features_cell(d: dict[str, Any]) -> str:
    if d.get("probe_error") is not None:
        return PROBE_FAILED
    if d.get("features") is not None:
        return ",".join(d["features"]) or NO_FEATURES
    return NOT_PROBED


def _printed_plainly(items: list[dict[str, Any]], as_json: bool, none: str) -> bool:
    """A list is printed as JSON, or as ``none`` when it is empty: then there is no table."""
    if as_json:
        print_json(items)
    elif not items:
        print(none)
    return as_json or not items


def print_descriptors(items: list[dict[str, Any]], as_json: bool) -> None:
    if _printed_plainly(items, as_json, "no descriptors"):
        return
    rows = [[d["name"], d["type"], d["tier"], d["binary"], _features_cell(d)] for d in items]
    print(table(rows, ["NAME", "TYPE", "TIER", "BINARY", "FEATURES"]))
    if any(r[4] in (NOT_PROBED, NO_FEATURES, PROBE_FAILED) for r in rows):
        print(f"\n{FEATURES_FOOTNOTE}")


def print_one(d: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(d)
        return
    rows = []
    for k in ["name", "path", "tier", "type", "description", "binary", "tags"]:
        v = d[k]
        rows.append([k + ":", ", ".join(v) if isinstance(v, list) else str(v)])
    if d.get("probe_error") is not None:
        rows.append(["probe_error:", str(d["probe_error"])])
    elif d.get("features") is not None:
        rows.append(["features:", ", ".join(d["features"]) or "(none: probed, no features)"])
    else:
        rows.append(["features:", "- (not probed)"])
    print(table(rows, ["", ""]).split("\n", 1)[1])


def print_backends(items: list[dict[str, Any]], as_json: bool) -> None:
    from vhostuserd.client import exit_text

    if _printed_plainly(items, as_json, "no backends"):
        return
    rows = []
    for b in items:
        state = (
            b["state"]
            if b["state"] != "exited"
            else f"exited: {exit_text(b['exit_status'], b['exit_signal'])}"
        )
        rows.append(
            [
                b["id"],
                b["descriptor"],
                str(b["pid"]),
                str(b["owner_uid"]),
                state,
                "yes" if b["detached"] else "no",
                *accounting_cells(b),
                " ".join(b["argv"] or ()),
            ]
        )
    print(
        table(
            rows,
            [
                "ID",
                "DESCRIPTOR",
                "PID",
                "UID",
                "STATE",
                "DETACHED",
                "CPU",
                "MEMORY",
                "TASKS",
                "COMMAND",
            ],
        )
    )


def accounting_cells(b: dict[str, Any]) -> list[str]:
    """CPU time, memory current/peak and tasks of a backend's cgroup; "-" where not measured."""
    from vhostuserd.core.units import format_bytes, format_usec

    cpu = format_usec(b["cpu_usec"]) if b.get("cpu_usec") is not None else "-"
    mem = "-"
    if b.get("memory_current") is not None:
        mem = format_bytes(b["memory_current"])
        if b.get("memory_peak") is not None:
            mem += f"/{format_bytes(b['memory_peak'])}"
    return [cpu, mem, str(b["tasks"]) if b.get("tasks") is not None else "-"]


def shadow_notes(
    diagnostics: Sequence[Sequence[str]], listed: set[str], only: str | None = None
) -> list[str]:
    """For each broken candidate file (an error diagnostic on a ``*.json`` file): the name it
    hides, since a file that fails validation still shadows the name in lower tiers."""
    notes = []
    for path, level, message in diagnostics:
        name = os.path.basename(path)
        if (
            level != "error"
            or not name.endswith(".json")
            or name in listed
            or (only and name != only)
        ):
            continue
        notes.append(
            f"{name}: not listed: {path} is broken and hides the name in every less specific "
            f"directory ({message}); fix or remove that file (vhostuserctl check {path})"
        )
    return notes


def unknown_type(btype: str) -> str | None:
    """The message for a backend type no descriptor schema knows, or None for a known one."""
    from vhostuserd.core.descriptors import KNOWN_TYPES

    if btype in KNOWN_TYPES:
        return None
    return f"{btype}: unknown backend type; the types are {', '.join(sorted(KNOWN_TYPES))}"
