"""The ``vhostuserctl`` commands that talk to the daemon, through `client`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable

from .cli import EXIT_FAILED, EXIT_OK, Failure, print_descriptors, print_json, print_one
from .client import BrokerClient, BrokerError, Event, ProbeFailed, Unavailable


async def _list(c: BrokerClient, a: argparse.Namespace) -> int:
    print_descriptors([d.as_dict() for d in await c.list_descriptors(a.type)], a.json)
    return EXIT_OK


async def _show(c: BrokerClient, a: argparse.Namespace) -> int:
    print_one((await c.show(a.name)).as_dict(), a.json)
    return EXIT_OK


async def _resolve(c: BrokerClient, a: argparse.Namespace) -> int:
    d = await c.resolve(a.type, a.feature)
    if a.json:
        print_json(d.as_dict())
    else:
        print(d.name)
    return EXIT_OK


async def _capabilities(c: BrokerClient, a: argparse.Namespace) -> int:
    caps = await c.capabilities(a.name)
    print(json.dumps(caps, indent=None if a.json else 2, sort_keys=True))
    return EXIT_OK


def _event_line(e: Event) -> str:
    props = e.properties or {}
    if e.kind == "index-changed":
        return f"index changed: generation {e.generation}"
    if e.kind == "descriptor-added":
        return f"descriptor added: {props.get('Name', '')} ({props.get('Type', '')}, {props.get('Path', '')})"
    if e.kind == "descriptor-removed":
        return f"descriptor removed: {props.get('Name', '')}"
    if e.kind == "backend-exited":
        return f"backend exited: {e.object} status {props.get('ExitStatus')} signal {props.get('ExitSignal')}"
    detail = " ".join(f"{k}={v}" for k, v in sorted(props.items()))
    return f"{e.kind.replace('-', ' ')}: {e.object} {detail}".rstrip()


async def _monitor(c: BrokerClient, a: argparse.Namespace) -> int:
    # Make sure the daemon runs (activating it) before we wait for its signals.
    generation = await c.generation()
    if not a.json:
        print(f"monitoring vhostuserd on {c.where} (generation {generation}); Ctrl-C to stop", flush=True)
    async for event in c.events():
        if a.json:
            print(json.dumps(event.as_dict(), sort_keys=True), flush=True)
        else:
            print(_event_line(event), flush=True)
    return EXIT_OK


COMMANDS: dict[str, Callable[[BrokerClient, argparse.Namespace], Awaitable[int]]] = {
    "list": _list,
    "show": _show,
    "resolve": _resolve,
    "capabilities": _capabilities,
    "monitor": _monitor,
}


async def _run(a: argparse.Namespace) -> int:
    client = await BrokerClient.connect(a.bus if not a.address else "address", a.address)
    try:
        return await COMMANDS[a.command](client, a)
    finally:
        await client.close()


def run_online(a: argparse.Namespace) -> int:
    try:
        return asyncio.run(_run(a))
    except Unavailable as e:
        hint = "; try --offline" if a.command in ("list", "show", "resolve", "capabilities") else ""
        print(f"vhostuserctl: {e}{hint}", file=sys.stderr)
        return EXIT_FAILED
    except ProbeFailed as e:
        raise Failure(str(e)) from None
    except BrokerError as e:
        raise Failure(f"{e} ({e.name})") from None
