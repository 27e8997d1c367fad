"""Who calls: the bus daemon's word on each connection (uid and pid, never the call's
arguments), cached per unique name, and which connections left the bus.

Owns the daemon's requests to org.freedesktop.DBus (credentials, NameHasOwner, the one match
for departures) and the records that make "has this caller left?" exact for a caller with a
Spawn in progress, however many other connections come and go.
"""

from __future__ import annotations

import contextlib
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from dbus_fast import Message, MessageType, Variant

from vhostuserd.bus.connection import Bus, error
from vhostuserd.core.errors import Err
from vhostuserd.edges.authority import CallTarget

DEPARTURES = (
    "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
    "member='NameOwnerChanged',arg2=''"
)
DBUS: CallTarget = {
    "destination": "org.freedesktop.DBus",
    "path": "/org/freedesktop/DBus",
    "interface": "org.freedesktop.DBus",
}
MAX_CACHED = 4096  # callers whose credentials are kept
MAX_DEPARTED = 8192  # recent departures remembered (one read of the socket carries fewer)


@dataclass(frozen=True)
class Caller:
    """Who is calling, from the bus's own records: never from the call's arguments."""

    name: str
    uid: int
    pid: int


class Callers:
    """The callers of the daemon on ``bus``, and their departures."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._known: dict[str, Caller] = {}
        self._departed: OrderedDict[str, None] = OrderedDict()
        # Callers with a Spawn in progress, and those of them that left the bus meanwhile:
        # exact, however many other connections come and go (the record above is bounded).
        self._calling: Counter[str] = Counter()
        self._left_mid_call: set[str] = set()
        # Told the unique name of each connection that leaves, after the records are updated.
        self.on_departure: list[Callable[[str], None]] = []
        bus.on_departure.append(self._departure)

    async def _dbus(
        self, member: str, signature: str = "", body: list[Any] | None = None
    ) -> list[Any]:
        reply = await self.bus.call(
            Message(member=member, signature=signature, body=body or [], **DBUS)
        )
        assert reply is not None
        if reply.message_type is MessageType.ERROR:
            raise LookupError(f"{reply.error_name}: {reply.body[0] if reply.body else ''}")
        return list(reply.body)

    async def start(self) -> None:
        """Hear about every connection that leaves the bus: one match for the daemon's life,
        instead of a match (and a round trip) per owner and per Spawn."""
        await self._dbus("AddMatch", "s", [DEPARTURES])

    async def caller(self, sender: str) -> Caller:
        """uid and pid of a connection, from the bus; cached, since unique names are never
        reused."""
        known = self._known.get(sender)
        if known is not None:
            return known
        try:
            (creds,) = await self._dbus("GetConnectionCredentials", "s", [sender])
        except LookupError as e:
            raise error(Err.NOT_AUTHORIZED, f"cannot identify the caller {sender}: {e}") from None
        caller = Caller(
            sender,
            int(creds["UnixUserID"].value),
            int(creds.get("ProcessID", Variant("u", 0)).value),
        )
        if sender not in self._departed:
            self._known[sender] = caller
            if len(self._known) > MAX_CACHED:
                self._known.pop(next(iter(self._known)))
        return caller

    async def name_has_owner(self, name: str) -> bool:
        (has,) = await self._dbus("NameHasOwner", "s", [name])
        return bool(has)

    @contextlib.contextmanager
    def calling(self, sender: str) -> Iterator[None]:
        """While a call of ``sender``'s is in progress, `left` is exact for it."""
        self._calling[sender] += 1
        try:
            yield
        finally:
            self._calling[sender] -= 1
            if not self._calling[sender]:
                del self._calling[sender]
                self._left_mid_call.discard(sender)

    def left(self, name: str) -> bool:
        """Has the caller ``name`` left the bus? Exact for a caller inside `calling` (a
        departure before the call's task ran is still in the recent-departures record: one
        read of the socket cannot carry MAX_DEPARTED of them)."""
        return name in self._left_mid_call or name in self._departed

    def _departure(self, name: str) -> None:
        self._known.pop(name, None)
        self._departed[name] = None
        if name in self._calling:
            self._left_mid_call.add(name)
        if len(self._departed) > MAX_DEPARTED:
            self._departed.popitem(last=False)
        for listener in self.on_departure:
            listener(name)
