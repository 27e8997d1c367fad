"""The commands that need no daemon: ``--offline`` list, show, capabilities and resolve, and
``check``. They run the lookup in this process (`vhostuserd.local`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from vhostuserd.cli.output import (
    EXIT_FAILED,
    EXIT_OK,
    Failure,
    print_descriptors,
    print_json,
    print_one,
    shadow_notes,
    unknown_type,
)
from vhostuserd.core.errors import Err


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
            notes[0] if notes else f"{args.name}: no such descriptor in the search path",
            Err.NOT_FOUND,
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
        raise Failure(f"{d.name}: {d.binary} --print-capabilities failed: {caps}", Err.PROBE_FAILED)
    print_json(json.loads(caps.json))
    return EXIT_OK


def offline_resolve(args: argparse.Namespace) -> int:
    from vhostuserd.local import descriptor_dict

    lookup = _offline(args)
    resolution, probed = lookup.resolve(args.type, args.feature)
    if resolution.chosen is None:
        if not any(d.type == args.type for d in lookup.result.descriptors):
            raise Failure(
                unknown_type(args.type) or resolution.explain(args.type, args.feature),
                Err.NOT_FOUND,
            )
        raise Failure(resolution.explain(args.type, args.feature), Err.NOT_FOUND)
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
    from vhostuserd.local import OfflineLookup, default_search_path, list_all, read_file

    files: list[tuple[str, Parsed]] = []
    extra: list[Diagnostic] = []
    shadow: dict[str, str] = {}
    if args.paths:
        for path in args.paths:
            parsed = read_file(path)
            if parsed is None:
                # read_file says None both for a directory and for no file at all.
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
        listings = list_all(dirs)
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


OFFLINE = {
    "list": offline_list,
    "show": offline_show,
    "resolve": offline_resolve,
    "capabilities": offline_capabilities,
}
