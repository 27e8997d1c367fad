"""A typed asyncio client for vhostuserd, for VM managers and for ``vhostuserctl``.

    async with await BrokerClient.connect("user") as broker:
        gpu = await broker.resolve("gpu", ["virgl"])
        print(gpu.name, gpu.binary, gpu.features)
        async for event in broker.events():
            print(event)

Owns the wire details (bus addressing, activation, message signatures, ObjectManager
signals on the manager path) and turns D-Bus errors into `BrokerError` subclasses named
after the service's errors.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from vhostuserd.core import fields
from vhostuserd.core.errors import INTERACTIVE_REQUIRED, Err
from vhostuserd.core.fields import BACKEND_FIELDS, json_from_bus
from vhostuserd.core.names import (
    BACKEND_IFACE,
    BUS_NAME,
    DESCRIPTOR_IFACE,
    MANAGER_IFACE,
    MANAGER_PATH,
)


class BrokerError(Exception):
    """A failed request. ``name`` is the D-Bus error name, ``str(e)`` its message."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name

    @property
    def err(self) -> Err | None:
        """Which of the service's errors (docs/contract.md section 6) this is, if any."""
        return Err.of(self.name)


class NotFound(BrokerError): ...


class InvalidOption(BrokerError): ...


class InvalidSocket(BrokerError): ...


class SpawnFailed(BrokerError): ...


class ProbeFailed(BrokerError): ...


class QuotaExceeded(BrokerError): ...


class LimitsExceeded(BrokerError):
    """The request was over one of the daemon's documented bounds (docs/contract.md section 6):
    send less, or call again once earlier calls are answered."""


class NotAuthorized(BrokerError): ...


class InteractiveAuthorizationRequired(NotAuthorized):
    """polkit would ask the user to authenticate, but the call did not allow it: retry with
    ``interactive=True`` (``vhostuserctl --allow-interactive-authorization``), with a polkit
    authentication agent running in the caller's session."""


class Unavailable(BrokerError):
    """The daemon is not on the bus and could not be activated, or the bus is unreachable."""


# The class of each of the service's errors: one per `Err` (a name without a class fails here,
# at import), named as the error is.
ERROR_CLASSES: dict[Err, type[BrokerError]] = {
    Err.NOT_FOUND: NotFound,
    Err.INVALID_OPTION: InvalidOption,
    Err.INVALID_SOCKET: InvalidSocket,
    Err.SPAWN_FAILED: SpawnFailed,
    Err.PROBE_FAILED: ProbeFailed,
    Err.QUOTA_EXCEEDED: QuotaExceeded,
    Err.NOT_AUTHORIZED: NotAuthorized,
    Err.LIMITS_EXCEEDED: LimitsExceeded,
}
_ERRORS: dict[str, type[BrokerError]] = {
    **{err.dbus_name: ERROR_CLASSES[err] for err in Err},
    INTERACTIVE_REQUIRED: InteractiveAuthorizationRequired,
}


def error_for(name: str, message: str) -> BrokerError:
    """The exception for a D-Bus error ``name``: its class above, else a plain `BrokerError`."""
    return _ERRORS.get(name, BrokerError)(name, message)


# What a bus answers for an object path nothing is exported at (older daemons, and dbus-fast,
# answer a call to a backend that does not exist this way).
_NO_OBJECT = {
    "org.freedesktop.DBus.Error.UnknownMethod",
    "org.freedesktop.DBus.Error.UnknownObject",
    "org.freedesktop.DBus.Error.UnknownInterface",
}
_UNAVAILABLE = {
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
    "org.freedesktop.DBus.Error.Spawn.ChildExited",
    "org.freedesktop.DBus.Error.Spawn.ExecFailed",
    "org.freedesktop.DBus.Error.Spawn.ServiceNotFound",
    "org.freedesktop.DBus.Error.Spawn.ChildSignaled",
    "org.freedesktop.DBus.Error.TimedOut",
    "org.freedesktop.DBus.Error.NoReply",
}


def _unwrap(value: Any) -> Any:
    if isinstance(value, Variant):
        return _unwrap(value.value)
    if isinstance(value, dict):
        return {k: _unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unwrap(v) for v in value]
    return value


class DescriptorInfo(fields.DescriptorInfo):
    """One effective descriptor as the daemon reports it (the ListDescriptors dict); `as_dict`
    is its JSON (docs/json.md)."""

    __slots__ = ()

    @classmethod
    def from_dict(cls, said: Mapping[str, Any]) -> Self:
        """From a ListDescriptors or Resolve dict, its values D-Bus variants or not."""
        return super().from_dict(_unwrap(said))


def backend_dict(props: dict[str, Any], object: str | None = None) -> dict[str, Any]:
    """The one JSON shape of a backend (docs/json.md) from a ListBackends dict or the D-Bus
    properties: snake_case keys, all present; the exit status and signal null (not -1) when
    they do not apply."""
    out = json_from_bus(BACKEND_FIELDS, props)
    if object is not None:
        out["object"] = object
    if out["id"] is None and out["object"]:
        out["id"] = str(out["object"]).rsplit("/", 1)[-1]
    return out


def exit_text(exit_status: int | None, exit_signal: int | None) -> str:
    """'exited with status N', 'killed by signal N (SIGNAME)', or 'exit status unknown'."""
    import signal

    if exit_signal is not None and exit_signal >= 0:
        try:
            return f"killed by signal {exit_signal} ({signal.Signals(exit_signal).name})"
        except ValueError:
            return f"killed by signal {exit_signal}"
    if exit_status is not None and exit_status >= 0:
        return f"exited with status {exit_status}"
    return "exit status unknown"


@dataclass(frozen=True)
class Event:
    """Something that happened in the broker.

    ``kind`` is one of ``index-changed`` (``generation``), ``descriptor-added``
    (``object``, ``properties``), ``descriptor-removed`` (``object``, ``name``),
    ``backend-added``, ``backend-removed``, ``backend-changed`` and ``backend-exited``.
    """

    kind: str
    object: str = ""
    generation: int | None = None
    properties: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """The Event object of docs/json.md: every key always present, null when it does not
        apply. ``name`` is the descriptor's name or the backend's id; ``descriptor`` and
        ``backend`` the whole object when one was added; ``state``, ``exit_status`` and
        ``exit_signal`` what a backend event says."""
        props = self.properties or {}
        out: dict[str, Any] = {
            "event": self.kind,
            "object": self.object or None,
            "generation": self.generation,
            "name": None,
            "descriptor": None,
            "backend": None,
            "state": None,
            "exit_status": None,
            "exit_signal": None,
        }
        if self.kind.startswith("descriptor-"):
            out["name"] = props.get("Name")
            if self.kind == "descriptor-added":
                info = DescriptorInfo.from_properties(props, self.object or None)
                out["descriptor"] = info.as_dict()
        elif self.kind.startswith("backend-"):
            out["name"] = self.object.rsplit("/", 1)[-1] if self.object else None
            b = backend_dict(props, self.object or None)
            if self.kind == "backend-added":
                out["backend"] = b
            out["state"] = b["state"] if self.kind != "backend-exited" else "exited"
            out["exit_status"], out["exit_signal"] = b["exit_status"], b["exit_signal"]
        return out


_BOOL_OPTIONS = {"virgl", "no-grab", "read-only", "detach"}


def option_variant(key: str, value: Any) -> Variant:
    """The D-Bus type docs/contract.md (section 3) gives each Spawn option."""
    if key == "settle-ms":
        return Variant("u", int(value))
    if key in _BOOL_OPTIONS or isinstance(value, bool):
        return Variant("b", bool(value))
    return Variant("s", str(value))


def backend_path(backend: str) -> str:
    return backend if backend.startswith("/") else f"{MANAGER_PATH}/backend/{backend}"


def _name_from_path(path: str) -> str:
    """A descriptor's name from its object path (the inverse of systemd's bus_label_escape)."""
    label = path.rsplit("/", 1)[-1]
    if label == "_":
        return ""
    out = bytearray()
    i = 0
    while i < len(label):
        if label[i] == "_":
            out.append(int(label[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(ord(label[i]))
            i += 1
    return out.decode("utf-8", "surrogateescape")


class BrokerClient:
    """A connection to vhostuserd on one bus."""

    def __init__(self, bus: MessageBus, where: str) -> None:
        self.bus = bus
        self.where = where

    @classmethod
    async def connect(cls, bus: str = "user", address: str | None = None) -> BrokerClient:
        """``bus`` is "user" (session bus), "system", or "address" with ``address``."""
        where = {"system": "the system bus", "user": "the session bus"}.get(bus, f"bus {address}")
        try:
            if bus == "address" or address:
                conn = MessageBus(bus_address=address, negotiate_unix_fd=True)
            else:
                conn = MessageBus(
                    bus_type=BusType.SYSTEM if bus == "system" else BusType.SESSION,
                    negotiate_unix_fd=True,
                )
            await asyncio.wait_for(conn.connect(), 10)
        except Exception as e:  # noqa: BLE001 - every way of not connecting means the same
            raise Unavailable(
                "org.freedesktop.DBus.Error.NoServer",
                f"cannot connect to {where}: {e or type(e).__name__}",
            ) from None
        return cls(conn, where)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self.bus.disconnect()
        with contextlib.suppress(Exception, asyncio.CancelledError):  # already gone is fine
            await asyncio.wait_for(self.bus.wait_for_disconnect(), 1)

    async def call(
        self,
        member: str,
        signature: str = "",
        body: Sequence[Any] = (),
        *,
        path: str = MANAGER_PATH,
        interface: str = MANAGER_IFACE,
        unix_fds: Sequence[int] = (),
        interactive: bool = False,
    ) -> list[Any]:
        """Call a method of the broker; the reply body, or a `BrokerError`."""
        from dbus_fast import MessageFlag

        msg = Message(
            destination=BUS_NAME,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=list(body),
            unix_fds=list(unix_fds),
            flags=MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION if interactive else MessageFlag.NONE,
        )
        reply = await self.bus.call(msg)
        assert reply is not None
        if reply.message_type is MessageType.ERROR:
            name = reply.error_name or "org.freedesktop.DBus.Error.Failed"
            text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else name
            if name in _UNAVAILABLE:
                raise Unavailable(
                    name,
                    f"vhostuserd is not running on {self.where} and could not be "
                    f"activated ({name}: {text})",
                )
            raise error_for(name, text)
        return list(reply.body)

    async def get_property(
        self, name: str, path: str = MANAGER_PATH, interface: str = MANAGER_IFACE
    ) -> Any:
        body = await self.call(
            "Get", "ss", [interface, name], path=path, interface="org.freedesktop.DBus.Properties"
        )
        return _unwrap(body[0])

    # ---- the index

    async def list_descriptors(self, type: str = "") -> list[DescriptorInfo]:
        (items,) = await self.call("ListDescriptors", "s", [type])
        return [DescriptorInfo.from_dict(d) for d in items]

    async def show(self, name: str) -> DescriptorInfo:
        """One descriptor with its capabilities probed (waits for the probe)."""
        try:
            await self.capabilities(name)
        except ProbeFailed:
            pass
        for d in await self.list_descriptors():
            if d.name == name:
                return d
        raise NotFound(
            Err.NOT_FOUND.dbus_name, f"{name}: no such descriptor in the effective index"
        )

    async def resolve(self, type: str, features: Sequence[str] = ()) -> DescriptorInfo:
        _path, d = await self.call("Resolve", "sas", [type, list(features)])
        return DescriptorInfo.from_dict(d)

    async def capabilities(self, name: str) -> dict[str, Any]:
        import json

        (text,) = await self.call("GetCapabilities", "s", [name])
        caps: dict[str, Any] = json.loads(text)
        return caps

    async def reload(self, *, interactive: bool = False) -> int:
        """Re-read every directory now; the new generation. The system service asks polkit
        (org.vhostuserd.manage)."""
        (generation,) = await self.call("Reload", interactive=interactive)
        return int(generation)

    async def generation(self) -> int:
        return int(await self.get_property("Generation"))

    async def search_path(self) -> list[str]:
        return list(await self.get_property("SearchPath"))

    async def diagnostics(self) -> list[tuple[str, str, str]]:
        return [tuple(d) for d in await self.get_property("Diagnostics")]

    async def version(self) -> str:
        return str(await self.get_property("Version"))

    async def cgroups(self) -> str:
        return str(await self.get_property("Cgroups"))

    # ---- backends

    async def spawn(
        self,
        name: str,
        socket_fd: int,
        options: dict[str, Any] | None = None,
        *,
        interactive: bool = False,
    ) -> str:
        """Start the backend of descriptor ``name`` on ``socket_fd``; returns its object path.

        ``options`` values may be `Variant`s or plain bool/int/str (typed as docs/contract.md
        says: settle-ms is 'u', the boolean options 'b', the rest 's'). ``interactive`` sets
        the message's ALLOW_INTERACTIVE_AUTHORIZATION flag: polkit may then ask the user to
        authenticate (through their authentication agent) instead of the call failing with
        `InteractiveAuthorizationRequired`.
        """
        typed = {
            k: v if isinstance(v, Variant) else option_variant(k, v)
            for k, v in (options or {}).items()
        }
        (path,) = await self.call(
            "Spawn", "sa{sv}h", [name, typed, 0], unix_fds=[socket_fd], interactive=interactive
        )
        return str(path)

    async def list_backends(self) -> list[dict[str, Any]]:
        """The caller's backends (everyone's for root and holders of org.vhostuserd.manage): the
        ListBackends dicts (`backend_dict` makes the JSON shape of one)."""
        (items,) = await self.call("ListBackends")
        return [_unwrap(b) for b in items]

    async def _backend_call(
        self,
        backend: str,
        member: str,
        signature: str = "",
        body: Sequence[Any] = (),
        interface: str = BACKEND_IFACE,
        interactive: bool = False,
    ) -> list[Any]:
        """A call to a backend object; `NotFound` ("no backend ID") when there is none."""
        path = backend_path(backend)
        try:
            return await self.call(
                member, signature, body, path=path, interface=interface, interactive=interactive
            )
        except NotFound as e:
            raise NotFound(e.name, f"no backend {backend}") from None
        except BrokerError as e:
            if e.name in _NO_OBJECT:
                raise NotFound(Err.NOT_FOUND.dbus_name, f"no backend {backend}") from None
            raise

    async def stop(self, backend: str, *, interactive: bool = False) -> None:
        """Stop a backend (its id or object path); returns when the process is gone.
        `NotFound` when there is no such backend (or it exited and its object is gone)."""
        await self._backend_call(backend, "Stop", interactive=interactive)

    async def get_log(self, backend: str) -> str:
        """The backend's last 64 KiB of output; readable until its object goes, which is
        3 seconds after it exited (docs/contract.md)."""
        (text,) = await self._backend_call(backend, "GetLog")
        return str(text)

    async def backend(self, backend: str) -> dict[str, Any]:
        """The backend's D-Bus properties (``State``, ``ExitStatus``, ...); `backend_dict`
        makes the JSON shape of them."""
        body = await self._backend_call(
            backend, "GetAll", "s", [BACKEND_IFACE], interface="org.freedesktop.DBus.Properties"
        )
        return dict(_unwrap(body[0]))

    # ---- events

    async def _add_match(self, rule: str) -> None:
        await self.bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="AddMatch",
                signature="s",
                body=[rule],
            )
        )

    async def events(self) -> AsyncIterator[Event]:
        """Index and object events, as they happen, until the connection closes.

        Listens only on the manager's path, as GDBus-style ObjectManager clients do. The
        subscription starts with the first iteration; `subscribe` starts it at once.
        """
        async for event in await self.subscribe():
            yield event

    async def subscribe(self) -> AsyncIterator[Event]:
        """The events of `events`, subscribed to before this returns: nothing that happens
        after the call is missed (e.g. subscribe, then Spawn, then wait for its Exited)."""
        queue: asyncio.Queue[Event | None] = asyncio.Queue()
        names: dict[str, str] = {}

        def handler(msg: Message) -> bool:
            if msg.message_type is not MessageType.SIGNAL or msg.path is None:
                return False
            if (
                msg.path == MANAGER_PATH
                and msg.member == "IndexChanged"
                and msg.interface == MANAGER_IFACE
            ):
                queue.put_nowait(Event("index-changed", generation=int(msg.body[0])))
            elif msg.path == MANAGER_PATH and msg.member == "InterfacesAdded":
                path, ifaces = msg.body
                for iface, props in ifaces.items():
                    kind = "descriptor" if iface == DESCRIPTOR_IFACE else "backend"
                    p = _unwrap(props)
                    if kind == "descriptor":
                        names[path] = p.get("Name", "")
                    queue.put_nowait(Event(f"{kind}-added", object=path, properties=p))
            elif msg.path == MANAGER_PATH and msg.member == "InterfacesRemoved":
                path, ifaces = msg.body
                for iface in ifaces:
                    if iface == DESCRIPTOR_IFACE:
                        name = names.pop(path, None) or _name_from_path(path)
                        queue.put_nowait(
                            Event("descriptor-removed", object=path, properties={"Name": name})
                        )
                    else:
                        queue.put_nowait(Event("backend-removed", object=path))
            elif msg.interface == BACKEND_IFACE and msg.member == "Exited":
                status, sig = msg.body
                queue.put_nowait(
                    Event(
                        "backend-exited",
                        object=msg.path,
                        properties={"ExitStatus": status, "ExitSignal": sig},
                    )
                )
            elif (
                msg.member == "PropertiesChanged"
                and msg.path.startswith(MANAGER_PATH + "/backend/")
                and msg.body
                and msg.body[0] == BACKEND_IFACE
            ):
                queue.put_nowait(
                    Event("backend-changed", object=msg.path, properties=_unwrap(msg.body[1]))
                )
            return False

        self.bus.add_message_handler(handler)
        owner = f"sender='{BUS_NAME}',"
        for rule in (
            f"type='signal',{owner}path='{MANAGER_PATH}',interface='{MANAGER_IFACE}'",
            f"type='signal',{owner}path='{MANAGER_PATH}',interface='org.freedesktop.DBus.ObjectManager'",
            f"type='signal',{owner}path_namespace='{MANAGER_PATH}/backend'",
        ):
            await self._add_match(rule)
        disconnected = asyncio.ensure_future(self.bus.wait_for_disconnect())
        disconnected.add_done_callback(lambda _f: queue.put_nowait(None))
        return self._drain(queue, handler, disconnected)

    async def _drain(
        self,
        queue: asyncio.Queue[Event | None],
        handler: Callable[[Message], bool],
        disconnected: asyncio.Future[Any],
    ) -> AsyncIterator[Event]:
        try:
            while True:
                event = await queue.get()
                if event is None:
                    return
                yield event
        finally:
            disconnected.cancel()
            self.bus.remove_message_handler(handler)
