"""Man pages for ``vhostuserd`` (8) and ``vhostuserctl`` (1), made from the same argparse
parsers that print ``--help``, so the two cannot drift apart.

    python -m vhostuserd.cli.manpage man/      # write man/vhostuserd.8 and man/vhostuserctl.1

tests/test_docs.py checks that the shipped pages equal what this produces (the README says
when to run it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vhostuserd import __version__

DATE = "2026-11"


def _esc(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(
        "\\&" + line if line.startswith((".", "'")) else line for line in text.split("\n")
    )


def _invocation(action: argparse.Action) -> str:
    if not action.option_strings:
        name = f"\\fI{_esc(str(action.metavar or action.dest))}\\fR"
        if action.nargs == "*":
            return f"[{name}...]"
        if action.nargs == "+":
            return f"{name}..."
        return name
    names = ", ".join(f"\\fB{_esc(o)}\\fR" for o in action.option_strings)
    if action.nargs == 0:
        return names
    if action.choices is not None and action.metavar is None:
        return f"{names} " + "|".join(f"\\fB{_esc(str(c))}\\fR" for c in action.choices)
    metavar = action.metavar or action.dest.upper()
    return f"{names} \\fI{_esc(str(metavar))}\\fR"


def _options(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> list[str]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
            continue
        if set(action.option_strings) & set(skip):
            continue
        out += [".TP", _invocation(action), _esc(action.help or "")]
    return out


def _page(
    name: str,
    section: int,
    summary: str,
    synopsis: str,
    description: str,
    body: list[str],
    extra: list[tuple[str, str]],
) -> str:
    lines = [
        f'.TH {name.upper()} {section} "{DATE}" "vhostuserd {__version__}" "vhostuserd"',
        ".SH NAME",
        f"{name} \\- {_esc(summary)}",
        ".SH SYNOPSIS",
        synopsis,
        ".SH DESCRIPTION",
        _esc(description),
        *body,
    ]
    for title, text in extra:
        lines += [f".SH {title}", *text.split("\n")]
    return "\n".join(lines) + "\n"


def _see_also(own: str) -> str:
    pages = [
        p for p in ("\\fBvhostuserctl\\fR(1)", "\\fBvhostuserd\\fR(8)") if f"B{own}\\" not in p
    ]
    return (
        ", ".join([*pages, "\\fBbusctl\\fR(1)", "\\fBpolkit\\fR(8)", "\\fBpkttyagent\\fR(1)"])
        + ".\n.PP\n"
        "The interface contract (lookup rules, D\\-Bus API, command line, JSON output, error names) "
        "is \\fIdocs/contract.md\\fR, the JSON output \\fIdocs/json.md\\fR, in the vhostuserd "
        "sources; QEMU's \\fIdocs/interop/vhost\\-user.rst\\fR (Backend program conventions)."
    )


ENVIRONMENT = """.TP
\\fBXDG_DATA_DIRS\\fR
the data tier's roots, most important first (default \\fI/usr/local/share:/usr/share\\fR).
.TP
\\fBXDG_CONFIG_HOME\\fR, \\fBHOME\\fR
the user tier's root (default \\fI$HOME/.config\\fR; session service and \\fB\\-\\-user\\fR only).
.TP
\\fBXDG_RUNTIME_DIR\\fR
where the session service records its backends (\\fI$XDG_RUNTIME_DIR/vhostuserd\\fR).
.TP
\\fBDBUS_SESSION_BUS_ADDRESS\\fR, \\fBDBUS_SYSTEM_BUS_ADDRESS\\fR
the buses \\fB\\-\\-user\\fR and \\fB\\-\\-system\\fR connect to."""

FILES = """.TP
\\fI$XDG_DATA_DIRS/qemu/vhost\\-user/*.json\\fR (default \\fI/usr/local/share\\fR, \\fI/usr/share\\fR)
descriptors shipped by distributions; an earlier data directory wins.
.TP
\\fISYSCONFDIR/qemu/vhost\\-user/*.json\\fR (default \\fI/etc\\fR)
the administrator's descriptors; override the data tier by file name.
.TP
\\fI$XDG_CONFIG_HOME/qemu/vhost\\-user/*.json\\fR
the user's descriptors (session service only).
.TP
\\fI/run/vhostuserd\\fR, \\fI$XDG_RUNTIME_DIR/vhostuserd\\fR
records of running backends (\\-\\-state\\-dir), so a restarted daemon re\\-adopts them."""


def vhostuserd_page() -> str:
    from vhostuserd.core.cmdline import build_parser

    p = build_parser(__version__)
    return _page(
        "vhostuserd",
        8,
        "the vhost-user backend broker (a D-Bus service)",
        "\\fBvhostuserd\\fR [\\fB\\-\\-system\\fR | \\fB\\-\\-user\\fR | \\fB\\-\\-address\\fR \\fIADDR\\fR] "
        "[\\fIOPTION\\fR]...",
        p.description or "",
        [
            ".PP",
            (
                "It owns \\fBorg.vhostuserd.Broker1\\fR, keeps a live index of the QEMU vhost\\-user "
                "backend descriptors, answers which backend serves a device type with given features, "
                "and starts backends for its clients with the socket they pass, supervising them "
                "(SIGTERM, then SIGKILL after the grace period). On the system bus, requests are "
                "authorized by polkit and backends run as the calling user. It is normally started by "
                "D\\-Bus activation."
            ),
            ".SH OPTIONS",
            *_options(p),
        ],
        [
            ("FILES", FILES),
            (
                "SIGNALS",
                (
                    ".TP\n\\fBSIGTERM\\fR, \\fBSIGINT\\fR\nstop cleanly; running backends are "
                    "left running and recorded, and are re\\-adopted by the next instance."
                ),
            ),
            (
                "EXIT STATUS",
                (
                    "0 after a clean stop; 1 with a one\\-line reason when it cannot start "
                    "(no bus, the name already owned); 2 for bad usage."
                ),
            ),
            ("ENVIRONMENT", ENVIRONMENT),
            ("SEE ALSO", _see_also("vhostuserd")),
        ],
    )


# The global options every command also takes: listed once, under OPTIONS.
PER_COMMAND = ("--system", "--user", "--address", "--json", "--allow-interactive-authorization")


def vhostuserctl_page() -> str:
    from vhostuserd.cli.main import build_parser

    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    body = [".SH OPTIONS", *_options(p), ".SH COMMANDS"]
    for name, cp in sub.choices.items():
        args = " ".join(
            _invocation(a) if not a.option_strings else f"[{_invocation(a)}]"
            for a in cp._actions
            if a.help != argparse.SUPPRESS
            and not isinstance(a, argparse._HelpAction)
            and not set(a.option_strings) & set(PER_COMMAND)
        )
        if cp.usage:  # a usage written out (spawn's: the two ways, and -- CMD)
            args = _esc(cp.usage.replace(f"%(prog)s {name}", "").replace("%(prog)s", "").strip())
        body += [".TP", f"\\fB{name}\\fR {args}".rstrip(), _esc(cp.description or "")]
        if cp.epilog:
            body += [".br", _esc(cp.epilog)]
        opts = _options(cp, skip=("-h", *PER_COMMAND))
        if opts:
            body += [".RS", *opts, ".RE"]
    return _page(
        "vhostuserctl",
        1,
        "query and drive vhostuserd, the vhost-user backend broker",
        "\\fBvhostuserctl\\fR [\\fB\\-\\-system\\fR | \\fB\\-\\-user\\fR | \\fB\\-\\-address\\fR \\fIADDR\\fR] "
        "[\\fB\\-\\-json\\fR] [\\fB\\-\\-allow\\-interactive\\-authorization\\fR] \\fICOMMAND\\fR ...",
        p.description or "",
        body,
        [
            (
                "EXAMPLES",
                (
                    ".nf\nvhostuserctl list\nvhostuserctl resolve gpu \\-\\-feature virgl\n"
                    "vhostuserctl spawn 50\\-qemu\\-virtiofsd.json \\-o shared\\-dir=/srv/share "
                    "\\-\\-listen /run/vm1/fs.sock\n"
                    "vhostuserctl spawn 50\\-qemu\\-gpu.json \\-\\-exec \\-\\- qemu\\-system\\-x86_64 ... "
                    "\\-chardev socket,id=gpu,fd={fd} \\-device vhost\\-user\\-gpu\\-pci,chardev=gpu\n"
                    "vhostuserctl list \\-\\-offline\nvhostuserctl check \\-\\-probe\n.fi"
                ),
            ),
            (
                "EXIT STATUS",
                (
                    "0 when the request was done; 1 when it failed (the reason is printed on one line, or "
                    "under \\fB\\-\\-json\\fR as a JSON object on stderr); 2 for bad usage. "
                    "\\fBspawn \\-\\-exec\\fR exits with the command's status, or 1 when the backend died "
                    "under a command that succeeded."
                ),
            ),
            ("FILES", FILES),
            ("ENVIRONMENT", ENVIRONMENT),
            ("SEE ALSO", _see_also("vhostuserctl")),
        ],
    )


PAGES = {"vhostuserd.8": vhostuserd_page, "vhostuserctl.1": vhostuserctl_page}


USAGE = (
    "usage: python -m vhostuserd.cli.manpage DIR   (writes DIR/vhostuserd.8 and DIR/vhostuserctl.1)"
)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args in (["-h"], ["--help"]):
        print(USAGE)
        return
    if len(args) != 1 or args[0].startswith("-"):
        sys.exit(USAGE)
    out = Path(args[0])
    out.mkdir(parents=True, exist_ok=True)
    for name, make in PAGES.items():
        (out / name).write_text(make())
        print(out / name)


if __name__ == "__main__":
    main()
