"""``vhostuserctl``: the command-line client (CONTRACT section 4).

Owns argument parsing and output (aligned tables for people, JSON for scripts). The
``--offline`` half runs the lookup in-process (`offline`); the rest talks to the daemon
through `client`. Exit status: 0 done, 1 the request failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class Failure(Exception):
    """A request that failed; the message is printed on one line to stderr."""


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    all_rows = [list(header)] + [list(r) for r in rows]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in all_rows]
    return "\n".join(lines)


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def _features_cell(d: dict[str, Any]) -> str:
    if "probe_error" in d:
        return "probe failed"
    if "features" in d:
        return ",".join(d["features"]) or "(none)"
    return "-"


def print_descriptors(items: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print_json(items)
        return
    rows = [[d["name"], d["type"], d["tier"], d["binary"], _features_cell(d)] for d in items]
    print(table(rows, ["NAME", "TYPE", "TIER", "BINARY", "FEATURES"]))


def print_one(d: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(d)
        return
    keys = ["name", "path", "tier", "type", "description", "binary", "tags", "features", "probe_error"]
    rows = []
    for k in keys:
        if k in d:
            v = d[k]
            rows.append([k + ":", ", ".join(v) if isinstance(v, list) else str(v)])
    print(table(rows, ["", ""]).split("\n", 1)[1])


# ---------------------------------------------------------------- offline commands


def _offline(args: argparse.Namespace) -> Any:
    from .offline import OfflineLookup, default_search_path

    return OfflineLookup(default_search_path(system=args.bus == "system", sysconfdir=args.sysconfdir))


def offline_list(args: argparse.Namespace) -> int:
    from .offline import descriptor_dict

    lookup = _offline(args)
    items = [descriptor_dict(d, None) for d in lookup.result.descriptors if args.type in ("", d.type)]
    print_descriptors(items, args.json)
    for diag in lookup.result.diagnostics:
        print(diag, file=sys.stderr)
    return EXIT_OK


def _offline_named(args: argparse.Namespace) -> tuple[Any, Any]:
    lookup = _offline(args)
    d = lookup.result.by_name(args.name)
    if d is None:
        raise Failure(f"{args.name}: no such descriptor in the search path")
    return lookup, d


def offline_show(args: argparse.Namespace) -> int:
    from .offline import descriptor_dict

    lookup, d = _offline_named(args)
    print_one(descriptor_dict(d, lookup.probe([d])[d.name]), args.json)
    return EXIT_OK


def offline_capabilities(args: argparse.Namespace) -> int:
    from .descriptors import ProbeError

    lookup, d = _offline_named(args)
    caps = lookup.probe([d])[d.name]
    if isinstance(caps, ProbeError):
        raise Failure(f"{d.name}: {d.binary} --print-capabilities failed: {caps}")
    print(json.dumps(json.loads(caps.json), indent=None if args.json else 2, sort_keys=True))
    return EXIT_OK


def offline_resolve(args: argparse.Namespace) -> int:
    from .offline import descriptor_dict

    lookup = _offline(args)
    resolution, probed = lookup.resolve(args.type, args.feature)
    if resolution.chosen is None:
        raise Failure(resolution.explain(args.type, args.feature))
    d = resolution.chosen
    if args.json:
        print_json(descriptor_dict(d, probed.get(d.name)))
    else:
        print(d.name)
    return EXIT_OK


def check(args: argparse.Namespace) -> int:
    from . import scan
    from .descriptors import ERROR, Diagnostic, Parsed
    from .offline import OfflineLookup, default_search_path

    files: list[tuple[str, Parsed]] = []
    extra: list[Diagnostic] = []
    shadow: dict[str, str] = {}
    if args.paths:
        for path in args.paths:
            parsed, _ = scan.read_candidate(path, os.path.basename(path), "check")
            if parsed is None:
                # read_candidate says None both for a directory and for no file at all.
                why = "is a directory, not a descriptor file" if os.path.isdir(path) else "does not exist"
                extra.append(Diagnostic(path, ERROR, why))
            else:
                files.append((path, parsed))
    else:
        from .lookup import shadowed

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
        by_path = {d.path: r for d, r in zip(valid, lookup.probe(valid).values(), strict=True)}
        from .descriptors import ProbeError

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
        entry: dict[str, Any] = {"path": path, "status": status, "diagnostics": [list(d.as_tuple()) for d in diags]}
        if path in shadow:
            entry["shadowed_by"] = shadow[path]
        report.append(entry)
    if args.json:
        print_json({"ok": not failed, "files": report, "diagnostics": [list(d.as_tuple()) for d in extra]})
    else:
        for d in extra:
            print(d)
        for entry in report:
            note = f" (shadowed by {entry['shadowed_by']})" if "shadowed_by" in entry else ""
            if entry["diagnostics"]:
                for p, level, msg in entry["diagnostics"]:
                    print(f"{p}: {level}: {msg}{note}")
            else:
                print(f"{entry['path']}: {entry['status']}{note}")
        if not report and not extra:
            print("no descriptor files found")
    return EXIT_FAILED if failed else EXIT_OK


# ---------------------------------------------------------------- parser


def _bus_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    default = argparse.SUPPRESS if suppress else None
    bus = parser.add_mutually_exclusive_group()
    bus.add_argument("--system", dest="bus", action="store_const", const="system", default=default,
                     help="talk to the system bus service (offline: data and sysconf tiers only)")
    bus.add_argument("--user", dest="bus", action="store_const", const="user", default=default,
                     help="talk to the session bus service (the default)")
    bus.add_argument("--address", default=default, metavar="ADDR", help="talk to the service on this bus address")
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS if suppress else False,
                        help="machine-readable output with the keys of the D-Bus API")


def _offline_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--offline", action="store_true",
                        help="resolve the directories in-process, without the daemon")
    parser.add_argument("--sysconfdir", default="/etc", metavar="DIR",
                        help="with --offline: the sysconf tier's root (default /etc)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vhostuserctl",
        description="Query and drive vhostuserd, the broker for QEMU vhost-user backends.",
    )
    parser.add_argument("--version", action="version", version=f"vhostuserctl {__version__}")
    _bus_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        _bus_options(p, suppress=True)
        return p

    p = command("list", "list the effective descriptors in priority order")
    p.add_argument("--type", default="", help="only descriptors of this type")
    _offline_options(p)
    p = command("show", "show one descriptor with its capabilities")
    p.add_argument("name", metavar="NAME", help="descriptor name, e.g. 50-qemu-gpu.json")
    _offline_options(p)
    p = command("resolve", "print the descriptor chosen for a type and features")
    p.add_argument("type", metavar="TYPE")
    p.add_argument("--feature", "-f", action="append", default=[], metavar="F",
                   help="a feature the backend must have (repeatable)")
    _offline_options(p)
    p = command("capabilities", "print a backend's --print-capabilities JSON")
    p.add_argument("name", metavar="NAME")
    _offline_options(p)
    command("monitor", "print index and backend events as they happen, until Ctrl-C")
    p = command("spawn", "start a backend on a socket: --listen PATH, or --exec -- CMD (e.g. QEMU)")
    p.add_argument("name", metavar="NAME", help="descriptor name, e.g. 50-qemu-gpu.json")
    p.add_argument("-o", "--option", action="append", default=[], metavar="KEY[=VALUE]",
                   help="a Spawn option, e.g. -o virgl, -o render-node=/dev/dri/renderD128, -o shared-dir=/srv")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--listen", metavar="PATH",
                     help="bind a listening socket at PATH and pass it (virtiofsd, vhost-user-blk)")
    how.add_argument("--exec", dest="exec_", action="store_true",
                     help="make a socketpair, pass one end, and run CMD with the other as fd 3 "
                     "({fd} in its arguments becomes 3); stop the backend when CMD exits")
    p.add_argument("--detach", action="store_true",
                   help="with --listen: keep the backend after this command exits; print its id")
    p.epilog = "With --exec, the command and its arguments follow a '--'."
    command("backends", "list running backends")
    p = command("stop", "stop a backend (SIGTERM, then SIGKILL after the grace period)")
    p.add_argument("id", metavar="ID")
    p = command("log", "print a backend's last 64 KiB of output")
    p.add_argument("id", metavar="ID")
    p = command("check", "validate descriptor files (the whole search path if none given)")
    p.add_argument("paths", nargs="*", metavar="PATH")
    p.add_argument("--probe", action="store_true", help="also run each backend's --print-capabilities")
    p.add_argument("--sysconfdir", default="/etc", metavar="DIR")
    return parser


OFFLINE = {
    "list": offline_list,
    "show": offline_show,
    "resolve": offline_resolve,
    "capabilities": offline_capabilities,
}


def run(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd: list[str] = []
    if "--" in argv:  # spawn --exec -- CMD ARG...: CMD's arguments are not ours to parse
        cut = argv.index("--")
        argv, cmd = argv[:cut], argv[cut + 1 :]
    args = parser.parse_args(argv)
    args.cmd = cmd
    if args.bus is None:
        args.bus = "user"
    if cmd and args.command != "spawn":
        parser.error(f"unexpected arguments after '--': {' '.join(cmd)}")
    if args.command == "spawn":
        if args.exec_ and not args.cmd:
            parser.error("spawn --exec needs a command after --")
        if not args.exec_ and args.cmd:
            parser.error(f"unexpected arguments: {' '.join(args.cmd)}")
        if args.detach and args.exec_:
            parser.error("--detach goes with --listen (with --exec the backend lives as long as CMD)")
    try:
        if args.command == "check":
            return check(args)
        if getattr(args, "offline", False):
            return OFFLINE[args.command](args)
        from .online import run_online

        return run_online(args)
    except Failure as e:
        print(f"vhostuserctl: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


def main() -> None:
    sys.exit(run())
