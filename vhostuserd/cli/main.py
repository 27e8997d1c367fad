"""``vhostuserctl``: the command-line client (docs/contract.md, section 4).

Owns the argument parser and the dispatch: ``check`` and the ``--offline`` commands run the
lookup in-process (`cli.offline`); the rest talk to the daemon through `client`
(`cli.online`); what is printed is `cli.output`'s. Exit status: 0 done, 1 the request failed,
2 bad usage.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from vhostuserd import __version__
from vhostuserd.cli.offline import OFFLINE, check
from vhostuserd.cli.output import EXIT_FAILED, EXIT_OK, Failure, print_error


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
    from vhostuserd.core.optiontable import OPTIONS

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
    for which, says in (
        ("system", "the system service's search path (the data and sysconf tiers)"),
        ("user", "the session service's search path (the default)"),
    ):
        bus.add_argument(
            f"--{which}",
            dest="bus",
            action="store_const",
            const=which,
            default=argparse.SUPPRESS,
            help=says,
        )
    p.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="the report as JSON (docs/json.md)",
    )


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
