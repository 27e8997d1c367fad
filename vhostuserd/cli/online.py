"""The ``vhostuserctl`` commands that talk to the daemon, through `client`.

Output follows docs/json.md under ``--json`` (one shape per object) and is a table or one line
per fact for people; failures raise `cli.Failure` (or a `client.BrokerError`), which `cli`
prints on one line, or as a JSON error object under ``--json``.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
import signal
import socket
import stat
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from vhostuserd.cli.output import (
    EXIT_FAILED,
    EXIT_OK,
    Failure,
    print_backends,
    print_descriptors,
    print_json,
    print_one,
    shadow_notes,
    unknown_type,
)
from vhostuserd.client import (
    BrokerClient,
    BrokerError,
    Event,
    InteractiveAuthorizationRequired,
    NotFound,
    ProbeFailed,
    Unavailable,
    backend_dict,
    exit_text,
)
from vhostuserd.core.errors import Err

LOG_TAIL_LINES = 20


async def _diagnostics(c: BrokerClient) -> list[tuple[str, str, str]]:
    try:
        return await c.diagnostics()
    except BrokerError:
        return []


async def _list(c: BrokerClient, a: argparse.Namespace) -> int:
    items = [d.as_dict() for d in await c.list_descriptors(a.type)]
    print_descriptors(items, a.json)
    for note in shadow_notes(await _diagnostics(c), {d["name"] for d in items}):
        print(f"vhostuserctl: {note}", file=sys.stderr)
    return EXIT_OK


async def _show(c: BrokerClient, a: argparse.Namespace) -> int:
    try:
        d = await c.show(a.name)
    except NotFound:
        notes = shadow_notes(await _diagnostics(c), set(), only=a.name)
        if notes:
            raise Failure(notes[0], Err.NOT_FOUND) from None
        raise
    print_one(d.as_dict(), a.json)
    return EXIT_OK


async def _resolve(c: BrokerClient, a: argparse.Namespace) -> int:
    try:
        d = await c.resolve(a.type, a.feature)
    except NotFound as e:
        unknown = unknown_type(a.type)
        raise Failure(f"{unknown}; {e}" if unknown else str(e), e.name) from None
    if a.json:
        print_json(d.as_dict())
    else:
        print(d.name)
    return EXIT_OK


async def _capabilities(c: BrokerClient, a: argparse.Namespace) -> int:
    print_json(await c.capabilities(a.name))
    return EXIT_OK


def _event_line(e: Event) -> str | None:
    """One line per event, descriptor and backend events alike: WHAT: WHO (DETAILS); None for
    a backend's change to "exited", which its Exited event tells with the status."""
    d = e.as_dict()
    if e.kind == "index-changed":
        return f"index changed: generation {e.generation}"
    if e.kind == "descriptor-added":
        desc = d["descriptor"]
        return f"descriptor added: {desc['name']} ({desc['type']}, {desc['tier']}, {desc['path']})"
    if e.kind == "descriptor-removed":
        return f"descriptor removed: {d['name']}"
    if e.kind == "backend-added":
        b = d["backend"]
        owner = "detached" if b["detached"] else f"uid {b['owner_uid']}"
        return (
            f"backend added: {b['id']} ({b['descriptor']}, pid {b['pid']}, {b['state']}, {owner})"
        )
    if e.kind == "backend-exited":
        return f"backend exited: {d['name']} ({exit_text(d['exit_status'], d['exit_signal'])})"
    if e.kind == "backend-changed":
        if d["state"] == "exited":
            return None
        return f"backend {d['state'] or 'changed'}: {d['name']}"
    return f"{e.kind.replace('-', ' ')}: {d['name'] or e.object}"


async def _monitor(c: BrokerClient, a: argparse.Namespace) -> int:
    # Make sure the daemon runs (activating it) before we wait for its signals.
    generation = await c.generation()
    if not a.json:
        print(
            f"monitoring vhostuserd on {c.where} (generation {generation}); Ctrl-C to stop",
            flush=True,
        )
    async for event in c.events():
        if a.json:
            print_json(event.as_dict(), lines=True)
        elif (line := _event_line(event)) is not None:
            print(line, flush=True)
    return EXIT_OK


def _parse_options(pairs: list[str], detach: bool) -> dict[str, Any]:
    from vhostuserd.client import option_variant
    from vhostuserd.core.optiontable import OPTIONS

    out: dict[str, Any] = {}
    for pair in pairs:
        key, has_value, value = pair.partition("=")
        if not key:
            raise Failure(f"-o {pair!r}: expected KEY or KEY=VALUE", Err.INVALID_OPTION)
        spec = OPTIONS.get(key)
        if spec is not None and spec.signature == "b":
            if has_value and value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise Failure(f"-o {key}: a yes/no option, not {value!r}", Err.INVALID_OPTION)
            out[key] = option_variant(key, not has_value or value.lower() in ("1", "true", "yes"))
        elif spec is None and not has_value:
            # A bare KEY the contract does not know: an admin's flag (options.conf flag.KEY).
            out[key] = option_variant(key, True)
        elif key == "settle-ms":
            if not value.isdigit():
                raise Failure(f"-o settle-ms: milliseconds, not {value!r}", Err.INVALID_OPTION)
            out[key] = option_variant(key, int(value))
        else:
            out[key] = option_variant(key, value)
    if detach:
        out["detach"] = option_variant("detach", True)
    return out


SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes, one of them the terminating NUL


def _listeners() -> list[str]:
    """The paths Unix sockets listen on in this network namespace (/proc/net/unix)."""
    try:
        lines = Path("/proc/net/unix").read_text(errors="surrogateescape").splitlines()[1:]
    except OSError:
        return []
    out = []
    for line in lines:
        fields = line.split(None, 7)
        # Flags 00010000 is __SO_ACCEPTCON: a listening socket.
        if len(fields) == 8 and int(fields[3], 16) & 0x10000 and not fields[7].startswith("@"):
            out.append(fields[7])
    return out


def _is_live(path: str) -> bool:
    """Whether a socket listens at ``path``, found without connecting to it: a vhost-user
    backend takes any connection as its front-end's, and exits when it closes."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    for bound in _listeners():
        if not os.path.isabs(bound) and os.path.basename(bound) == os.path.basename(path):
            return True  # bound by a relative name: it may well be this one
        try:
            other = os.stat(bound)
        except OSError:
            continue
        if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
            return True
    return False


def listen_socket(path: str, *, replace: bool) -> socket.socket:
    """A Unix socket listening at ``path``. Only ever replaces a socket, and only one nothing
    listens on, and only when asked (``replace``); never connects to what is there."""
    size = len(os.fsencode(path))
    if size > SUN_PATH_MAX:
        raise Failure(
            f"cannot listen on {path}: the path is {size} bytes, and a Unix socket path "
            f"may have at most {SUN_PATH_MAX} (sun_path is 108 bytes); use a shorter one, "
            "e.g. in $XDG_RUNTIME_DIR or relative to the current directory",
            Err.INVALID_SOCKET,
        )
    try:
        st: os.stat_result | None = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise Failure(f"cannot listen on {path}: {e.strerror}", Err.INVALID_SOCKET) from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise Failure(
                f"cannot listen on {path}: it is a directory; give the socket's own path, "
                f"e.g. {os.path.join(path, 'backend.sock')}",
                Err.INVALID_SOCKET,
            )
        if not stat.S_ISSOCK(st.st_mode):
            kind = "a regular file" if stat.S_ISREG(st.st_mode) else "not a socket"
            raise Failure(
                f"cannot listen on {path}: it exists and is {kind}; vhostuserctl only "
                "replaces a stale socket: choose another path",
                Err.INVALID_SOCKET,
            )
        if _is_live(path):
            raise Failure(
                f"cannot listen on {path}: a socket there is listening (a running backend? "
                "see vhostuserctl backends); stop it first or choose another path",
                Err.INVALID_SOCKET,
            )
        if not replace:
            raise Failure(
                f"cannot listen on {path}: a socket is already there, and nothing listens on "
                "it; pass --replace to replace it",
                Err.INVALID_SOCKET,
            )
        try:
            os.unlink(path)
        except OSError as e:
            raise Failure(
                f"cannot replace the stale socket {path}: {e.strerror}", Err.INVALID_SOCKET
            ) from None
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        listener.listen(1)
    except OSError as e:
        listener.close()
        if e.errno == errno.ENOENT:
            why = f"the directory {os.path.dirname(path) or '.'} does not exist"
        elif e.errno == errno.EADDRINUSE:
            why = "something appeared there meanwhile; try again"
        else:
            why = e.strerror or str(e)
        raise Failure(f"cannot listen on {path}: {why}", Err.INVALID_SOCKET) from None
    return listener


async def _exit_report(c: BrokerClient, backend_id: str, props: dict[str, Any], during: str) -> str:
    """What a backend that died under the command did: its status and the tail of its log,
    read at once (the daemon keeps an exited backend's object, and so its log, only briefly)."""
    status = exit_text(*_exit_of(props))
    try:
        text = await c.get_log(backend_id)
    except BrokerError:
        text = ""
    lines = text.rstrip("\n").splitlines()[-LOG_TAIL_LINES:] if text.strip() else []
    report = f"vhostuserctl: backend {backend_id} {status} {during}"
    if lines:
        report += f"; its last {len(lines)} line(s) of output:\n" + "\n".join(
            f"  {x}" for x in lines
        )
    else:
        report += "; it printed nothing"
    return report


def _crashed(props: dict[str, Any]) -> bool:
    """Whether a backend that exited by itself failed: a signal or a non-zero status. A backend
    that exits 0 finished (vhost-user backends exit 0 when their front-end closes the socket,
    e.g. when QEMU exits), and which of the two exits is seen first is a race."""
    status, sig = _exit_of(props)
    return sig is not None or status != 0


def _exit_of(props: dict[str, Any]) -> tuple[int | None, int | None]:
    b = backend_dict(props)
    return b["exit_status"], b["exit_signal"]


async def _follow_until(
    events: AsyncIterator[Event], path: str, stop: asyncio.Future[Any]
) -> dict[str, Any] | None:
    """Print the backend's events until it exits (returns its properties) or ``stop`` is done."""
    it = events.__aiter__()
    while True:
        nxt = asyncio.ensure_future(it.__anext__())
        done, _ = await asyncio.wait({nxt, stop}, return_when=asyncio.FIRST_COMPLETED)
        if nxt not in done:
            nxt.cancel()
            return None
        try:
            e = nxt.result()
        except StopAsyncIteration:
            return None
        if e.object == path and e.kind in ("backend-changed", "backend-exited"):
            if (line := _event_line(e)) is not None:
                print(line, file=sys.stderr, flush=True)
            if e.kind == "backend-exited":
                return e.properties or {}


async def _final(c: BrokerClient, backend_id: str, path: str) -> dict[str, Any]:
    """The backend's JSON object now (its last state, while the daemon still has it)."""
    try:
        return backend_dict(await c.backend(backend_id), path)
    except BrokerError:
        return backend_dict({"id": backend_id, "state": "exited"}, path)


def _unlink_ours(path: str, ours: os.stat_result) -> None:
    """Remove the socket we bound, unless something else is there now."""
    try:
        now = os.lstat(path)
        if (now.st_dev, now.st_ino) == (ours.st_dev, ours.st_ino):
            os.unlink(path)
    except OSError:
        pass


async def _spawn(c: BrokerClient, a: argparse.Namespace) -> int:
    options = _parse_options(a.option, a.detach)
    loop = asyncio.get_running_loop()
    interactive = a.interactive
    if a.listen:
        listener = listen_socket(a.listen, replace=a.replace)
        ours = os.lstat(a.listen)
        events = await c.subscribe()
        try:
            path = await c.spawn(a.name, listener.fileno(), options, interactive=interactive)
        except BaseException:
            _unlink_ours(a.listen, ours)
            raise
        finally:
            listener.close()
        backend_id = path.rsplit("/", 1)[-1]
        if a.detach:
            if a.json:
                print_json(await _final(c, backend_id, path))
            else:
                print(backend_id)
            return EXIT_OK
        print(
            f"backend {backend_id} serving {a.listen}; Ctrl-C stops it", file=sys.stderr, flush=True
        )
        interrupted: asyncio.Future[None] = loop.create_future()

        def interrupt() -> None:
            if not interrupted.done():
                interrupted.set_result(None)

        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(signum, interrupt)
        props = await _follow_until(events, path, interrupted)
        if props is None:
            await c.stop(backend_id)
        else:
            print(
                await _exit_report(c, backend_id, props, f"while serving {a.listen}"),
                file=sys.stderr,
            )
        if a.json:
            print_json(await _final(c, backend_id, path))
        _unlink_ours(a.listen, ours)
        return EXIT_OK if props is None else EXIT_FAILED
    # --exec: one end to the backend, the other to CMD as fd 3.
    import shutil

    from vhostuserd import local

    argv = [arg.replace("{fd}", "3") for arg in a.cmd]
    exe = shutil.which(argv[0])
    if exe is None:
        raise Failure(f"{argv[0]}: command not found")
    ours_sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    events = await c.subscribe()
    try:
        path = await c.spawn(a.name, theirs.fileno(), options, interactive=interactive)
    finally:
        theirs.close()
    backend_id = path.rsplit("/", 1)[-1]
    try:
        pid, exited = local.run_with_socket(loop, [exe, *argv[1:]], ours_sock.fileno())
    except OSError as e:
        ours_sock.close()
        await c.stop(backend_id)
        raise Failure(f"cannot run {argv[0]}: {e.strerror}") from None
    ours_sock.close()
    print(
        f"backend {backend_id} started; running {' '.join(argv)} (pid {pid})",
        file=sys.stderr,
        flush=True,
    )
    # Ctrl-C reaches CMD from the terminal itself; forward what the terminal does not send.
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, os.kill, pid, signum)
    died = await _follow_until(events, path, exited)
    crashed = died is not None and _crashed(died)
    if crashed:
        # The backend failed under CMD: say so now (CMD may go on without it), then wait for CMD.
        print(
            await _exit_report(c, backend_id, died or {}, f"while {argv[0]} ran"),
            file=sys.stderr,
            flush=True,
        )
    status = await exited
    final = await _final(c, backend_id, path)
    if died is None:
        try:
            await c.stop(backend_id)
        except NotFound:
            pass  # it exited just now and is gone
        final = await _final(c, backend_id, path)
    code, sig = local.describe_status(status)
    how = "stopped" if died is None else exit_text(*_exit_of(died))
    print(f"{argv[0]} {local.status_text(status)}; backend {backend_id} {how}", file=sys.stderr)
    if a.json:
        print_json(final)
    rc = code if sig < 0 else 128 + sig
    if crashed and rc == 0:
        return EXIT_FAILED  # the command succeeded, but the backend failed under it
    return rc


async def _backends(c: BrokerClient, a: argparse.Namespace) -> int:
    print_backends([backend_dict(b) for b in await c.list_backends()], a.json)
    return EXIT_OK


async def _stop(c: BrokerClient, a: argparse.Namespace) -> int:
    before = backend_dict(await c.backend(a.id), None)
    stopping = asyncio.ensure_future(c.stop(a.id, interactive=a.interactive))
    done, _ = await asyncio.wait({stopping}, timeout=1.0)
    if not done and not a.json:
        print(
            f"backend {before['id']}: sent SIGTERM to pid {before['pid']}; waiting for it to exit "
            "(SIGKILL after the daemon's grace period)",
            file=sys.stderr,
            flush=True,
        )
    await stopping
    after = await _final(c, before["id"], before["object"])
    if a.json:
        print_json(after)
    else:
        was = "" if before["state"] == "running" else f" (it was {before['state']})"
        print(
            f"backend {after['id']} ({after['descriptor'] or before['descriptor']}) stopped{was}: "
            f"{exit_text(after['exit_status'], after['exit_signal'])}"
        )
    return EXIT_OK


async def _log(c: BrokerClient, a: argparse.Namespace) -> int:
    text = await c.get_log(a.id)
    if a.json:
        print_json({"id": a.id.rsplit("/", 1)[-1], "log": text})
    else:
        sys.stdout.write(text)
    return EXIT_OK


async def _status(c: BrokerClient, a: argparse.Namespace) -> int:
    version = await c.version()
    generation = await c.generation()
    search = await c.search_path()
    diags = await _diagnostics(c)
    cgroups = await c.cgroups()
    backends = [backend_dict(b) for b in await c.list_backends()]
    running = [b for b in backends if b["state"] != "exited"]
    mode = (
        {"system": "system", "user": "user"}.get(a.bus, "unknown") if not a.address else "unknown"
    )
    doc = {
        "version": version,
        "bus": a.address or a.bus,
        "mode": mode,
        "generation": generation,
        "search_path": search,
        "diagnostics": [{"path": p, "level": lv, "message": m} for p, lv, m in diags],
        "backends": len(running),
        "cgroups": cgroups,
    }
    if a.json:
        print_json(doc)
        return EXIT_OK
    print(f"vhostuserd {version} on {c.where}" + (f" ({mode} mode)" if mode != "unknown" else ""))
    print(f"index generation: {generation}")
    print("search path (most specific last):" if search else "search path: (empty)")
    for d in search:
        print(f"  {d}")
    print(
        f"diagnostics: {len(diags)}"
        + (" (vhostuserctl check lists them with their files)" if diags else "")
    )
    for p, lv, m in diags:
        print(f"  {p}: {lv}: {m}")
    print(f"backend cgroups: {cgroups}")
    print(
        f"backends: {len(running)} running"
        + (f", {len(backends) - len(running)} just exited" if len(backends) > len(running) else "")
    )
    return EXIT_OK


async def _reload(c: BrokerClient, a: argparse.Namespace) -> int:
    generation = await c.reload(interactive=a.interactive)
    if a.json:
        print_json({"generation": generation})
    else:
        print(f"reloaded: index generation {generation}")
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
    "status": _status,
    "reload": _reload,
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
        raise Failure(f"{e}{hint}", e.name) from None
    except InteractiveAuthorizationRequired as e:
        hint = (
            ""
            if a.interactive
            else "; re-run with --allow-interactive-authorization, with a polkit authentication "
            "agent in your session (e.g. pkttyagent in a terminal)"
        )
        raise Failure(f"not authorized without authentication: {e}{hint}", e.name) from None
    except (ProbeFailed, NotFound) as e:
        raise Failure(str(e), e.name) from None
    except BrokerError as e:
        raise Failure(
            str(e) if e.name.startswith("org.vhostuserd.") else f"{e} ({e.name})", e.name
        ) from None
