"""The ``vhostuserctl`` commands that talk to the daemon, through `client`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from .cli import EXIT_FAILED, EXIT_OK, Failure, print_descriptors, print_json, print_one, table
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


def _parse_options(pairs: list[str], detach: bool) -> dict[str, Any]:
    from .client import option_variant

    out: dict[str, Any] = {}
    for pair in pairs:
        key, has_value, value = pair.partition("=")
        if not key:
            raise Failure(f"-o {pair!r}: expected KEY or KEY=VALUE")
        if key in ("virgl", "no-grab", "read-only", "detach"):
            if has_value and value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise Failure(f"-o {key}: a yes/no option, not {value!r}")
            out[key] = option_variant(key, not has_value or value.lower() in ("1", "true", "yes"))
        elif key == "settle-ms":
            if not value.isdigit():
                raise Failure(f"-o settle-ms: milliseconds, not {value!r}")
            out[key] = option_variant(key, int(value))
        else:
            out[key] = option_variant(key, value)
    if detach:
        out["detach"] = option_variant("detach", True)
    return out


async def _follow_until(c: BrokerClient, path: str, stop: asyncio.Future[Any]) -> dict[str, Any] | None:
    """Print the backend's events until it exits (returns its properties) or ``stop`` is done."""
    events = c.events().__aiter__()
    while True:
        nxt = asyncio.ensure_future(events.__anext__())
        done, _ = await asyncio.wait({nxt, stop}, return_when=asyncio.FIRST_COMPLETED)
        if nxt not in done:
            nxt.cancel()
            return None
        try:
            e = nxt.result()
        except StopAsyncIteration:
            return None
        if e.object == path and e.kind in ("backend-changed", "backend-exited"):
            print(_event_line(e), file=sys.stderr, flush=True)
            if e.kind == "backend-exited":
                return e.properties


async def _spawn(c: BrokerClient, a: argparse.Namespace) -> int:
    import os
    import signal
    import socket

    options = _parse_options(a.option, a.detach)
    loop = asyncio.get_running_loop()
    if a.listen:
        try:
            if os.path.exists(a.listen) and not os.path.isdir(a.listen):
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    probe.connect(a.listen)
                    raise Failure(f"{a.listen}: something is already listening there")
                except (ConnectionRefusedError, OSError) as e:
                    if isinstance(e, Failure):
                        raise
                    os.unlink(a.listen)  # a stale socket from an earlier run
                finally:
                    probe.close()
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(a.listen)
            listener.listen(1)
        except OSError as e:
            raise Failure(f"cannot listen on {a.listen}: {e.strerror}") from None
        try:
            path = await c.spawn(a.name, listener.fileno(), options)
        finally:
            listener.close()
        backend_id = path.rsplit("/", 1)[-1]
        if a.detach:
            print(backend_id)
            return EXIT_OK
        print(f"backend {backend_id} serving {a.listen}; Ctrl-C stops it", file=sys.stderr, flush=True)
        interrupted: asyncio.Future[None] = loop.create_future()
        def interrupt() -> None:
            if not interrupted.done():
                interrupted.set_result(None)

        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(signum, interrupt)
        props = await _follow_until(c, path, interrupted)
        if props is None:
            await c.stop(backend_id)
        try:
            os.unlink(a.listen)
        except OSError:
            pass
        return EXIT_OK if props is None else EXIT_FAILED
    # --exec: one end to the backend, the other to CMD as fd 3.
    import shutil

    from . import procs

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        path = await c.spawn(a.name, theirs.fileno(), options)
    finally:
        theirs.close()
    backend_id = path.rsplit("/", 1)[-1]
    argv = [arg.replace("{fd}", "3") for arg in a.cmd]
    exe = shutil.which(argv[0])
    if exe is None:
        ours.close()
        await c.stop(backend_id)
        raise Failure(f"{argv[0]}: command not found")
    reaper = procs.Reaper(loop)
    reaper.install()
    try:
        pid = procs.spawn([exe, *argv[1:]], fds={0: 0, 1: 1, 2: 2, 3: ours.fileno()}, env=dict(os.environ),
                          new_session=False)
    except OSError as e:
        ours.close()
        await c.stop(backend_id)
        raise Failure(f"cannot run {argv[0]}: {e.strerror}") from None
    ours.close()
    exited = reaper.watch(pid)
    print(f"backend {backend_id} started; running {' '.join(argv)} (pid {pid})", file=sys.stderr, flush=True)
    # Ctrl-C reaches CMD from the terminal itself; forward what the terminal does not send.
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, os.kill, pid, signum)
    await _follow_until(c, path, exited)
    status = await exited
    try:
        await c.stop(backend_id)
    except BrokerError:
        pass  # already gone
    code, sig = procs.describe_status(status)
    print(f"{argv[0]} {procs.status_text(status)}; backend {backend_id} stopped", file=sys.stderr)
    return code if sig < 0 else 128 + sig


async def _backends(c: BrokerClient, a: argparse.Namespace) -> int:
    items = await c.list_backends()
    if a.json:
        print_json(items)
        return EXIT_OK
    rows = [[b["id"], b["descriptor"], str(b["pid"]), str(b["owner_uid"]), b["state"],
             "yes" if b["detached"] else "no", " ".join(b["argv"])] for b in items]
    print(table(rows, ["ID", "DESCRIPTOR", "PID", "UID", "STATE", "DETACHED", "COMMAND"]))
    return EXIT_OK


async def _stop(c: BrokerClient, a: argparse.Namespace) -> int:
    await c.stop(a.id)
    return EXIT_OK


async def _log(c: BrokerClient, a: argparse.Namespace) -> int:
    sys.stdout.write(await c.get_log(a.id))
    return EXIT_OK


COMMANDS: dict[str, Callable[[BrokerClient, argparse.Namespace], Awaitable[int]]] = {
    "spawn": _spawn,
    "backends": _backends,
    "stop": _stop,
    "log": _log,
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
