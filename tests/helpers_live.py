"""Helpers for the tests against the running daemon: deadlines, a listening client, the
expected index computed from a fresh scan, and a barrier for file events.

`Listener` makes its calls and receives its signals on ONE connection. The broker sends
signals and replies on one connection too, and the bus keeps the order of messages
from one sender, so once a reply has arrived every signal the broker sent before it has
arrived as well. `Listener.settle` uses that: it writes a broken barrier file, waits
until the daemon reports its diagnostic, removes it and waits until the diagnostic is
gone. The daemon reads inotify events in order, so after `settle` it has processed every
file event that happened before, and every signal those events caused is in
`Listener.signals`. Counting signals after `settle` is therefore exact, with no sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Self

from busutil import BUS_NAME, MANAGER_PATH, Tree, await_for
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from vhostuserd.bus.manager import descriptor_path

MANAGER_IFACE = "org.vhostuserd.Broker1.Manager"
DESCRIPTOR_IFACE = "org.vhostuserd.Broker1.Descriptor"
OM_IFACE = "org.freedesktop.DBus.ObjectManager"
PROPS_IFACE = "org.freedesktop.DBus.Properties"
ERROR_PREFIX = "org.vhostuserd.Broker1.Error."

TIMEOUT = 10.0


Row = tuple[str, str, str, str, str, str, tuple[str, ...]]

_barriers = itertools.count()


def unwrap(value: Any) -> Any:
    if isinstance(value, Variant):
        return unwrap(value.value)
    if isinstance(value, dict):
        return {k: unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unwrap(v) for v in value]
    return value


# ---------------------------------------------------------------- what is on disk


def row(d: Any) -> Row:
    """The descriptor fields of a `Descriptor` or of an (unwrapped) ListDescriptors dict."""
    if isinstance(d, dict):
        return (
            d["name"],
            d["path"],
            d["tier"],
            d["type"],
            d["description"],
            d["binary"],
            tuple(d["tags"]),
        )
    return (d.name, d.path, d.tier, d.type, d.description, d.binary, tuple(d.tags))


def expected_rows(tree: Tree) -> list[Row]:
    return [row(d) for d in tree.lookup().descriptors]


def expected_diagnostics(tree: Tree) -> list[tuple[str, str, str]]:
    return [d.as_tuple() for d in tree.lookup().diagnostics]


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write a temporary dot-file next to ``path`` and rename it over ``path``."""
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    tmp.rename(path)


def overwrite(path: Path, data: bytes | str) -> None:
    """Change a file in place, the way an editor saving without a temporary does, but in
    one write(2) and without truncating first: no reader can catch it empty or half old."""
    raw = data.encode() if isinstance(data, str) else data
    assert len(raw) >= path.stat().st_size, "the new content must not be shorter"
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.write(fd, raw) == len(raw)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- the listening client


class CallFailed(AssertionError):
    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message


class Listener:
    """One connection to the bus that records every signal the broker sends it."""

    DEFAULT_RULES = (f"type='signal',sender='{BUS_NAME}'",)

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus
        self.signals: list[Message] = []
        bus.add_message_handler(self._record)

    @classmethod
    async def open(cls, address: str, rules: Sequence[str] = DEFAULT_RULES) -> Listener:
        bus = await MessageBus(bus_address=address, negotiate_unix_fd=True).connect()
        listener = cls(bus)
        for rule in rules:
            await listener.dbus("AddMatch", "s", [rule])
        return listener

    def _record(self, msg: Message) -> bool:
        if msg.message_type is MessageType.SIGNAL and msg.sender != "org.freedesktop.DBus":
            self.signals.append(msg)
        return False

    async def close(self) -> None:
        self.bus.disconnect()
        with contextlib.suppress(Exception):  # already gone is fine
            await asyncio.wait_for(self.bus.wait_for_disconnect(), 2)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- calls

    async def dbus(self, member: str, signature: str = "", body: Sequence[Any] = ()) -> list[Any]:
        reply = await self.bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member=member,
                signature=signature,
                body=list(body),
            )
        )
        assert reply is not None and reply.message_type is MessageType.METHOD_RETURN, reply
        return list(reply.body)

    async def raw(
        self,
        member: str,
        signature: str = "",
        body: Sequence[Any] = (),
        *,
        path: str = MANAGER_PATH,
        interface: str | None = MANAGER_IFACE,
        unix_fds: Sequence[int] = (),
    ) -> Message:
        reply = await self.bus.call(
            Message(
                destination=BUS_NAME,
                path=path,
                interface=interface,
                member=member,
                signature=signature,
                body=list(body),
                unix_fds=list(unix_fds),
            )
        )
        assert reply is not None
        return reply

    async def call(
        self,
        member: str,
        signature: str = "",
        body: Sequence[Any] = (),
        *,
        path: str = MANAGER_PATH,
        interface: str = MANAGER_IFACE,
    ) -> list[Any]:
        reply = await self.raw(member, signature, body, path=path, interface=interface)
        if reply.message_type is MessageType.ERROR:
            raise CallFailed(reply.error_name or "", reply.body[0] if reply.body else "")
        return list(reply.body)

    async def prop(self, name: str, path: str = MANAGER_PATH, iface: str = MANAGER_IFACE) -> Any:
        (value,) = await self.call("Get", "ss", [iface, name], path=path, interface=PROPS_IFACE)
        return unwrap(value)

    async def generation(self) -> int:
        return int(await self.prop("Generation"))

    async def descriptors(self, btype: str = "") -> list[dict[str, Any]]:
        (items,) = await self.call("ListDescriptors", "s", [btype])
        return [unwrap(d) for d in items]

    async def rows(self) -> list[Row]:
        return [row(d) for d in await self.descriptors()]

    async def diagnostics(self) -> list[tuple[str, str, str]]:
        return [tuple(d) for d in await self.prop("Diagnostics")]  # type: ignore[misc]

    # ---- signals

    def mark(self) -> int:
        return len(self.signals)

    def since(
        self,
        mark: int,
        member: str | None = None,
        path: str | None = None,
        interface: str | None = None,
    ) -> list[Message]:
        return [
            m
            for m in self.signals[mark:]
            if (member is None or m.member == member)
            and (path is None or m.path == path)
            and (interface is None or m.interface == interface)
        ]

    def index_changed(self, mark: int) -> list[int]:
        signals = self.since(mark, "IndexChanged", MANAGER_PATH, MANAGER_IFACE)
        return [int(m.body[0]) for m in signals]

    async def wait_signal(
        self, pred: Callable[[Message], bool], what: str, mark: int = 0, timeout: float = TIMEOUT
    ) -> Message:
        def found() -> Message | None:
            return next((m for m in self.signals[mark:] if pred(m)), None)

        msg: Message = await await_for(found, what, timeout)
        return msg

    # ---- the daemon's view against the disk

    async def wait_rows(
        self, want: Callable[[list[Row]], bool] | list[Row], what: str
    ) -> list[Row]:
        last: list[Row] = []

        async def ok() -> bool:
            nonlocal last
            last = await self.rows()
            return want(last) if callable(want) else last == want

        await await_for(ok, lambda: f"{what}; ListDescriptors is {last}")
        return last

    async def wait_probed(self) -> list[dict[str, Any]]:
        """Wait until every descriptor has been probed (successfully or not)."""
        last: list[dict[str, Any]] = []

        async def done() -> bool:
            nonlocal last
            last = await self.descriptors()
            return all("features" in d or "probe_error" in d for d in last)

        await await_for(done, lambda: f"every descriptor to be probed; have {last}")
        return last

    async def wait_names(self, names: list[str]) -> None:
        await self.wait_rows(lambda rows: [r[0] for r in rows] == names, f"the names {names}")

    async def settle(self, directory: Path) -> None:
        """Return once the daemon has processed every event in ``directory`` (a watched
        directory) that happened before this call (see the module docstring)."""
        path = directory / f"zz-barrier-{next(_barriers)}.json"
        path.write_text("{barrier")
        await await_for(self._has_diag(str(path), True), f"the barrier diagnostic for {path}")
        path.unlink()
        await await_for(
            self._has_diag(str(path), False), f"the barrier diagnostic for {path} to go"
        )

    def _has_diag(self, path: str, present: bool) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return any(d[0] == path for d in await self.diagnostics()) == present

        return check

    async def assert_matches_disk(self, tree: Tree) -> list[dict[str, Any]]:
        """ListDescriptors, Diagnostics and SearchPath equal a fresh scan of ``tree``."""
        items = await self.descriptors()
        assert [row(d) for d in items] == expected_rows(tree)
        assert [d["object"] for d in items] == [descriptor_path(d["name"]) for d in items]
        assert await self.diagnostics() == expected_diagnostics(tree)
        assert await self.prop("SearchPath") == [d.path for d in tree.search_path()]
        return items

    async def assert_generation(self, mark: int, before: int, changes: int) -> None:
        """Exactly ``changes`` IndexChanged since ``mark``, numbered on from ``before``,
        and the Generation property agrees."""
        got = self.index_changed(mark)
        assert got == list(range(before + 1, before + 1 + changes)), (
            f"expected {changes} IndexChanged after generation {before}, got {got}"
        )
        assert await self.generation() == before + changes


async def listen(address: str, rules: Sequence[str] = Listener.DEFAULT_RULES) -> Listener:
    return await Listener.open(address, rules)


class MatchWatcher:
    """A bus monitor (org.freedesktop.DBus.Monitoring) that sees every AddMatch call.

    dbus-daemon copies a message to monitors only after handling it, so once a rule shows
    up here it is installed: a test can wait until a subprocess subscribed to signals,
    instead of sleeping and hoping it did.
    """

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus
        self.rules: list[tuple[str, str]] = []  # (sender, rule)
        bus.add_message_handler(self._record)

    @classmethod
    async def open(cls, address: str) -> MatchWatcher:
        bus = await MessageBus(bus_address=address).connect()
        watcher = cls(bus)
        reply = await bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus.Monitoring",
                member="BecomeMonitor",
                signature="asu",
                body=[["type='method_call',interface='org.freedesktop.DBus',member='AddMatch'"], 0],
            )
        )
        assert reply is not None and reply.message_type is MessageType.METHOD_RETURN, reply
        return watcher

    def _record(self, msg: Message) -> bool:
        if msg.message_type is MessageType.METHOD_CALL and msg.member == "AddMatch":
            self.rules.append((msg.sender or "", msg.body[0]))
        # Copies of other connections' calls are not ours to answer; a monitor that sends
        # anything is disconnected by the bus.
        return msg.message_type is MessageType.METHOD_CALL

    async def wait_rules(self, *fragments: str, exclude: Sequence[str] = ()) -> str:
        """Wait until one connection (not in ``exclude``) added rules containing each of
        ``fragments``; return its unique name."""

        def found() -> str | None:
            by_sender: dict[str, list[str]] = {}
            for sender, rule in self.rules:
                if sender not in exclude:
                    by_sender.setdefault(sender, []).append(rule)
            for sender, rules in by_sender.items():
                if all(any(f in r for r in rules) for f in fragments):
                    return sender
            return None

        sender: str = await await_for(
            found, lambda: f"match rules with {fragments}; seen {self.rules}"
        )
        return sender

    async def close(self) -> None:
        self.bus.disconnect()
