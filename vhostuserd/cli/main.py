"""``vhostuserctl``: the command-line client (docs/contract.md, section 4).

Owns argument parsing and output (aligned tables for people, the JSON of docs/json.md for
scripts). The ``--offline`` half runs the lookup in-process (`offline`); the rest talks to the
daemon through `client`. Exit status: 0 done, 1 the request failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from vhostuserd import __version__
from vhostuserd.core.names import ERROR_PREFIX

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class Failure(Exception):
    """A request that failed; the message is printed on one line to stderr (under ``--json``,
    as ``{"error": NAME, "message": MESSAGE}``). ``name`` is the D-Bus error name, or the short
    name of one of the service's errors (NotFound, InvalidSocket, ...), default Failed."""

    def __init__(self, message: str, name: str = "Failed") -> None:
        super().__init__(message)
        self.name = name if "." in name else ERROR_PREFIX + name


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


def print_descriptors(items: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print_json(items)
        return
    if not items:
        print("no descriptors")
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

    if as_json:
        print_json(items)
        return
    if not items:
        print("no backends")
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
    from vhostuserd.edges.cgroup import format_bytes, format_usec

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


# ---------------------------------------------------------------- offline commands


def _offline(args: argparse.Namespace) -> Any:
    from vhostuserd.local import OfflineLookup, default_search_path

    return OfflineLookup(
        default_search_path(system=args.bus == "system", sysconfdir=args.sysconfdir)
    )


def offline_list(args: argparse.Namespace) -> int:
    from vhostuserd.local import descriptor_dict

    lookup = _offline(args)
    items = [
        descriptor_dict(d, None) for d in lookup.result.descriptors if args.type in ("", d.type)
    ]
    print_descriptors(items, args.json)
    diags = [d.as_tuple() for d in lookup.result.diagnostics]
    notes = shadow_notes(diags, {d["name"] for d in items})
    for diag in lookup.result.diagnostics:
        print(diag, file=sys.stderr)
    for note in notes:
        print(f"vhostuserctl: {note}", file=sys.stderr)
    return EXIT_OK


def _offline_named(args: argparse.Namespace) -> tuple[Any, Any]:
    lookup = _offline(args)
    d = lookup.result.by_name(args.name)
    if d is None:
        notes = shadow_notes(
            [x.as_tuple() for x in lookup.result.diagnostics], set(), only=args.name
        )
        raise Failure(
            notes[0] if notes else f"{args.name}: no such descriptor in the search path", "NotFound"
        )
    return lookup, d


def offline_show(args: argparse.Namespace) -> int:
    from vhostuserd.local import descriptor_dict

    lookup, d = _offline_named(args)
    print_one(descriptor_dict(d, lookup.probe_each([d])[0]), args.json)
    return EXIT_OK


def offline_capabilities(args: argparse.Namespace) -> int:
    from vhostuserd.core.descriptors import ProbeError

    lookup, d = _offline_named(args)
    caps = lookup.probe_each([d])[0]
    if isinstance(caps, ProbeError):
        raise Failure(f"{d.name}: {d.binary} --print-capabilities failed: {caps}", "ProbeFailed")
    print_json(json.loads(caps.json))
    return EXIT_OK


def offline_resolve(args: argparse.Namespace) -> int:
    from vhostuserd.local import descriptor_dict

    lookup = _offline(args)
    resolution, probed = lookup.resolve(args.type, args.feature)
    if resolution.chosen is None:
        if not any(d.type == args.type for d in lookup.result.descriptors):
            raise Failure(
                unknown_type(args.type) or resolution.explain(args.type, args.feature), "NotFound"
            )
        raise Failure(resolution.explain(args.type, args.feature), "NotFound")
    d = resolution.chosen
    if args.json:
        print_json(descriptor_dict(d, probed.get(d.name)))
    else:
        print(d.name)
    return EXIT_OK


def diag_json(d: Any) -> dict[str, str]:
    """The Diagnostic object of docs/json.md."""
    path, level, message = d.as_tuple()
    return {"path": path, "level": level, "message": message}


def check(args: argparse.Namespace) -> int:
    from vhostuserd.core.descriptors import ERROR, Diagnostic, Parsed
    from vhostuserd.edges import scan
    from vhostuserd.local import OfflineLookup, default_search_path

    files: list[tuple[str, Parsed]] = []
    extra: list[Diagnostic] = []
    shadow: dict[str, str] = {}
    if args.paths:
        for path in args.paths:
            parsed, _ = scan.read_candidate(path, os.path.basename(path), "check")
            if parsed is None:
                # read_candidate says None both for a directory and for no file at all.
                why = (
                    "is a directory, not a descriptor file"
                    if os.path.isdir(path)
                    else "does not exist"
                )
                extra.append(Diagnostic(path, ERROR, why))
            else:
                files.append((path, parsed))
    else:
        from vhostuserd.core.lookup import shadowed

        dirs = default_search_path(system=args.bus == "system", sysconfdir=args.sysconfdir)
        listings = scan.list_all(dirs)
        for listing in listings:
            extra.extend(listing.diagnostics)
            for name in sorted(listing.entries):
                files.append((f"{listing.directory.path}/{name}", listing.entries[name]))
        shadow = dict(shadowed(listings))
    probe_errors: dict[str, str] = {}
    if args.probe:
        lookup = OfflineLookup(())
        valid = [p.descriptor for _, p in files if p.descriptor is not None]
        # One result per file: files in different tiers may share a name (the shadowing case).
        by_path = {d.path: r for d, r in zip(valid, lookup.probe_each(valid), strict=True)}
        from vhostuserd.core.descriptors import ProbeError

        probe_errors = {p: str(r) for p, r in by_path.items() if isinstance(r, ProbeError)}
    report = []
    failed = bool([d for d in extra if d.level == ERROR])
    for path, parsed in files:
        diags = list(parsed.diagnostics)
        if path in probe_errors:
            diags.append(Diagnostic(path, ERROR, f"probe failed: {probe_errors[path]}"))
        status = "masked" if parsed.masked else "ok"
        if any(d.level == ERROR for d in diags):
            status, failed = "error", True
        elif diags:
            status = "warning"
        entry: dict[str, Any] = {
            "path": path,
            "status": status,
            "diagnostics": [diag_json(d) for d in diags],
            "shadowed_by": shadow.get(path),
        }
        report.append(entry)
    if args.json:
        print_json(
            {"ok": not failed, "files": report, "diagnostics": [diag_json(d) for d in extra]}
        )
    else:
        for d in extra:
            print(d)
        for entry in report:
            note = f" (shadowed by {entry['shadowed_by']})" if entry["shadowed_by"] else ""
            if entry["diagnostics"]:
                for dj in entry["diagnostics"]:
                    print(f"{dj['path']}: {dj['level']}: {dj['message']}{note}")
            else:
                print(f"{entry['path']}: {entry['status']}{note}")
        if not report and not extra:
            print("no descriptor files found")
    return EXIT_FAILED if failed else EXIT_OK


# ---------------------------------------------------------------- parser

ONLINE_ONLY = ("spawn", "backends", "stop", "log", "monitor", "status", "reload")


def _bus_options(parser: argparse.ArgumentParser, suppress: bool, offline: bool) -> None:
    default = argparse.SUPPRESS if suppress else None
    bus = parser.add_mutually_exclusive_group()
    system_help = "talk to the system bus service"
    if offline:
        system_help += " (with --offline: the data and sysconf tiers only, as the system service)"
    bus.add_argument(
        "--system",
        dest="bus",
        action="store_const",
        const="system",
        default=default,
        help=system_help,
    )
    bus.add_argument(
        "--user",
        dest="bus",
        action="store_const",
        const="user",
        default=default,
        help="talk to the session bus service (the default)",
    )
    bus.add_argument(
        "--address", default=default, metavar="ADDR", help="talk to the service on this bus address"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="machine-readable output, one JSON shape per object (docs/json.md); "
        "errors as a JSON object on stderr",
    )
    parser.add_argument(
        "--allow-interactive-authorization",
        dest="interactive",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="let polkit ask for authentication (needs a polkit agent, e.g. pkttyagent) "
        "instead of failing when the system service requires it",
    )


def _offline_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--offline",
        action="store_true",
        help="resolve the directories in-process, without the daemon",
    )
    parser.add_argument(
        "--sysconfdir",
        default="/etc",
        metavar="DIR",
        help="with --offline: the sysconf tier's root (default /etc)",
    )


def _types() -> str:
    from vhostuserd.core.descriptors import KNOWN_TYPES

    return ", ".join(sorted(KNOWN_TYPES))


def _option_keys() -> str:
    from vhostuserd.core.options import OPTIONS

    out = []
    for key, spec in OPTIONS.items():
        if key == "detach":
            continue  # --detach
        kind = {"b": "yes/no", "u": "milliseconds"}.get(spec.signature, "a path")
        if key == "idmap":
            kind = "caller or subids: the user namespace's id mapping"
        out.append(f"{key} ({spec.btype or 'any type'}, {kind})")
    return "; ".join(out)


NAME_HELP = "a descriptor's name (its file name, e.g. 50-qemu-gpu.json; see vhostuserctl list)"
ID_HELP = "a backend's id (see vhostuserctl backends) or its object path"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vhostuserctl",
        description="Query and drive vhostuserd, the broker for QEMU vhost-user backends.",
        epilog="The interface is specified in docs/contract.md; JSON output in docs/json.md.",
    )
    parser.add_argument("--version", action="version", version=f"vhostuserctl {__version__}")
    _bus_options(parser, suppress=False, offline=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help: str, offline: bool = False, **kw: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, **kw)
        _bus_options(p, suppress=True, offline=offline)
        return p

    p = command("list", "list the effective descriptors in priority order", offline=True)
    p.add_argument(
        "--type", default="", metavar="TYPE", help=f"only descriptors of this type ({_types()})"
    )
    _offline_options(p)
    p = command("show", "show one descriptor with its capabilities", offline=True)
    p.add_argument("name", metavar="NAME", help=NAME_HELP)
    _offline_options(p)
    p = command("resolve", "print the descriptor chosen for a type and features", offline=True)
    p.add_argument("type", metavar="TYPE", help=f"the backend type: {_types()}")
    p.add_argument(
        "--feature",
        "-f",
        action="append",
        default=[],
        metavar="F",
        help="a feature the backend must have (repeatable), e.g. virgl, render-node",
    )
    _offline_options(p)
    p = command("capabilities", "print a backend's --print-capabilities JSON", offline=True)
    p.add_argument("name", metavar="NAME", help=NAME_HELP)
    _offline_options(p)
    command(
        "monitor",
        "print index and backend events as they happen, until Ctrl-C (--json: one object per line)",
    )
    p = command(
        "spawn",
        "start a backend on a socket: --listen PATH, or --exec -- CMD (e.g. QEMU)",
        usage=(
            "%(prog)s NAME [-o KEY[=VALUE]]... "
            "(--listen PATH [--replace] [--detach] | --exec -- CMD [ARG...])"
        ),
        epilog=f"Options (-o): {_option_keys()}. With --exec, the command and its arguments "
        "follow a '--'; {fd} in them becomes 3.",
    )
    p.add_argument("name", metavar="NAME", help=NAME_HELP)
    p.add_argument(
        "-o",
        "--option",
        action="append",
        default=[],
        metavar="KEY[=VALUE]",
        help="a Spawn option (repeatable), e.g. -o virgl, -o render-node=/dev/dri/renderD128, "
        "-o shared-dir=/srv; the keys are listed below",
    )
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--listen",
        metavar="PATH",
        help="bind a listening socket at PATH and pass it (virtiofsd, vhost-user-blk); PATH "
        "must not exist, or be a socket nothing listens on and --replace is given",
    )
    how.add_argument(
        "--exec",
        dest="exec_",
        action="store_true",
        help="make a socketpair, pass one end, and run CMD with the other as fd 3 "
        "({fd} in its arguments becomes 3); stop the backend when CMD exits",
    )
    p.add_argument(
        "--replace",
        action="store_true",
        help="with --listen: replace a stale socket at PATH (never a live one, nor any other file)",
    )
    p.add_argument(
        "--detach",
        action="store_true",
        help="with --listen: keep the backend after this command exits; print its id",
    )
    p = command("backends", "list running backends (and those that exited in the last 3 seconds)")
    p = command(
        "stop", "stop a backend (SIGTERM, then SIGKILL after the grace period) and say how it ended"
    )
    p.add_argument("id", metavar="ID", help=ID_HELP)
    p = command("log", "print a backend's last 64 KiB of output")
    p.add_argument("id", metavar="ID", help=ID_HELP)
    command(
        "status",
        "the service's version, bus, search path, index generation, diagnostics and backends",
    )
    command(
        "reload",
        "re-read every descriptor directory now (the system service asks polkit: "
        "org.vhostuserd.manage)",
    )
    p = sub.add_parser(
        "check",
        help="validate descriptor files (the whole search path if none given)",
        description="validate descriptor files (the whole search path if none given); "
        "exit 1 on any error. Runs in-process: no daemon is involved.",
    )
    _check_bus_options(p)
    p.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="a descriptor file to check (default: every "
        "candidate file of the search path, shadowed ones included)",
    )
    p.add_argument(
        "--probe", action="store_true", help="also run each backend's --print-capabilities"
    )
    p.add_argument(
        "--sysconfdir", default="/etc", metavar="DIR", help="the sysconf tier's root (default /etc)"
    )
    return parser


def _check_bus_options(p: argparse.ArgumentParser) -> None:
    bus = p.add_mutually_exclusive_group()
    bus.add_argument(
        "--system",
        dest="bus",
        action="store_const",
        const="system",
        default=argparse.SUPPRESS,
        help="the system service's search path (the data and sysconf tiers)",
    )
    bus.add_argument(
        "--user",
        dest="bus",
        action="store_const",
        const="user",
        default=argparse.SUPPRESS,
        help="the session service's search path (the default)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="the report as JSON (docs/json.md)",
    )


OFFLINE = {
    "list": offline_list,
    "show": offline_show,
    "resolve": offline_resolve,
    "capabilities": offline_capabilities,
}


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices[name]
            return found
    return parser


def run(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd: list[str] = []
    if "--" in argv:  # spawn --exec -- CMD ARG...: CMD's arguments are not ours to parse
        cut = argv.index("--")
        argv, cmd = argv[:cut], argv[cut + 1 :]
    args = parser.parse_args(argv)
    args.cmd = cmd
    if getattr(args, "bus", None) is None:
        args.bus = "user"
    for key, default in (("address", None), ("json", False), ("interactive", False)):
        if not hasattr(args, key):
            setattr(args, key, default)
    usage = _subparser(parser, args.command)
    if cmd and args.command != "spawn":
        usage.error(f"unexpected arguments after '--': {' '.join(cmd)}")
    if args.command == "spawn":
        if args.exec_ and not args.cmd:
            usage.error("spawn --exec needs a command after --")
        if not args.exec_ and args.cmd:
            usage.error(f"unexpected arguments: {' '.join(args.cmd)}")
        if args.detach and args.exec_:
            usage.error(
                "--detach goes with --listen (with --exec the backend lives as long as CMD)"
            )
        if args.replace and args.exec_:
            usage.error("--replace goes with --listen")
    if getattr(args, "offline", False) and args.address:
        usage.error("--offline reads the directories itself: --address means nothing with it")
    try:
        if args.command == "check":
            return check(args)
        if getattr(args, "offline", False):
            return OFFLINE[args.command](args)
        from vhostuserd.cli.online import run_online

        return run_online(args)
    except Failure as e:
        print_error(str(e), e.name, args.json)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


def main() -> None:
    sys.exit(run())
