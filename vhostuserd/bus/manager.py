"""The D-Bus face of the broker: the Manager and Descriptor objects of docs/contract.md section 3.

Owns what is exported (paths, interfaces, properties, signals, error names) and the bus
connection's fixes: ObjectManager signals sent from the manager's path (dbus-fast sends
them from the object's own), the calling message made available to handlers, and received
fds closed for every call that does not take them. Lookup and spawning logic live in the
modules it wires together (`index`, `capabilities`, `resolve`).
"""

from __future__ import annotations

import array
import asyncio
import contextvars
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from dbus_fast import Message, MessageType, PropertyAccess, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.aio.message_bus import _MessageWriter
from dbus_fast.errors import DBusError
from dbus_fast.service import ServiceInterface, dbus_property, method, signal

from vhostuserd import __version__
from vhostuserd.core.descriptors import (
    Capabilities,
    Descriptor,
    Diagnostic,
    ProbeError,
    ProbeResult,
)
from vhostuserd.core.flow import ReplyCredit
from vhostuserd.core.index import Change, Index
from vhostuserd.core.names import (
    BACKEND_IFACE,
    BACKEND_PREFIX,
    DESCRIPTOR_IFACE,
    DESCRIPTOR_PREFIX,
    ERROR_PREFIX,
    INTROSPECTABLE_IFACE,
    MANAGER_IFACE,
    MANAGER_PATH,
    OBJECT_MANAGER_IFACE,
    PEER_IFACE,
    PROPERTIES_IFACE,
)
from vhostuserd.core.resolve import resolve
from vhostuserd.edges.probe import ProbeCache

if TYPE_CHECKING:
    from vhostuserd.bus.backends import Spawner

log = logging.getLogger("vhostuserd.service")

# What a caller may see of another user's backend on the system service (docs/threat-model.md,
# "Per-caller view"): everything but these, which say what it runs, as whom, and where.
PRIVATE_BACKEND_PROPERTIES = frozenset({"Argv", "Pid", "Owner", "OwnerUid"})

# What one request may carry and one error may say (docs/threat-model.md, "Bounded replies"):
# no reply may grow with what a caller sends, or a caller that never reads its replies makes
# the daemon queue megabytes for it.
MAX_FEATURES = 64
MAX_FEATURE_BYTES = 128
MAX_ERROR_CHARS = 4096

# A method call's (path, interface, member, signature), as its message has them (None for a
# header field it lacks: a call need not name an interface).
_CallKey = tuple[str | None, str | None, str | None, str]

# Calls that may carry fds: (path prefix, interface, member, signature).
FD_TAKING_CALLS: set[_CallKey] = {(MANAGER_PATH, MANAGER_IFACE, "Spawn", "sa{sv}h")}

current_message: contextvars.ContextVar[Message] = contextvars.ContextVar("current_message")


def bounded(message: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``message``, cut to about ``limit`` characters in the middle (a long name a caller sent
    usually comes first, the reason last), with a note saying how much was cut."""
    if len(message) <= limit:
        return message
    keep = (limit - 40) // 2
    return f"{message[:keep]} [... {len(message) - 2 * keep} characters cut ...] {message[-keep:]}"


def error(name: str, message: str) -> DBusError:
    return DBusError(ERROR_PREFIX + name, bounded(message))


def features_error(features: list[str]) -> str | None:
    """Why a requested feature list is refused (LimitsExceeded), or None. Says how much was
    sent, never what: echoing it is what made an error as large as the call."""
    if len(features) > MAX_FEATURES:
        return f"{len(features)} features requested; at most {MAX_FEATURES} may be"
    for i, f in enumerate(features):
        if len(f.encode("utf-8", "surrogateescape")) > MAX_FEATURE_BYTES:
            return (
                f"feature #{i} is {len(f)} characters long; at most {MAX_FEATURE_BYTES} bytes each"
            )
    return None


def escape_label(name: str) -> str:
    """systemd's bus_label_escape: keep [A-Za-z] (and digits after the first), hex the rest."""
    raw = name.encode("utf-8", "surrogateescape")
    if not raw:
        return "_"
    out = []
    for i, b in enumerate(raw):
        c = chr(b)
        if c.isascii() and (c.isalpha() or (i > 0 and c.isdigit())):
            out.append(c)
        else:
            out.append(f"_{b:02x}")
    return "".join(out)


def descriptor_path(name: str) -> str:
    return DESCRIPTOR_PREFIX + escape_label(name)


class _PatientWriter(_MessageWriter):
    """dbus-fast's writer, except that a full socket is waited out instead of ending the
    connection: dbus-fast 5.2 treats EAGAIN from send() as fatal (python-dbus-next#153), so
    any peer slow to read its replies could take the daemon off the bus. Each reply also
    passes the bus's reply credit (`flow`) first."""

    bus: Bus

    def buffer_message(self, msg: Message, future: asyncio.Future[None] | None = None) -> None:
        data = msg._marshall(self.negotiate_unix_fd)
        if (
            msg.message_type in _REPLIES
            and msg.destination
            and not self.bus.admit_reply(msg.destination, len(data))
        ):
            if future is not None and not future.done():
                future.set_result(None)
            return
        self.messages.append((data, list(msg.unix_fds) or None, future))

    def write_callback(self, remove_writer: bool = True) -> None:
        sock, fd = self.sock, self.fd
        assert sock is not None and fd is not None
        try:
            while True:
                if self.buf is None:
                    if not self.messages:
                        if remove_writer:
                            self.loop.remove_writer(fd)
                        return
                    buf, unix_fds, fut = self.messages.popleft()
                    self.unix_fds = unix_fds
                    self.buf = memoryview(buf)
                    self.offset = 0
                    self.fut = fut
                try:
                    if self.unix_fds and self.negotiate_unix_fd:
                        rights = [
                            (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", self.unix_fds))
                        ]
                        sent = sock.sendmsg([self.buf[self.offset :]], rights)
                        self.unix_fds = None
                    else:
                        sent = sock.send(self.buf[self.offset :])
                except (BlockingIOError, InterruptedError):
                    # Full: the loop calls us again when it drains (schedule_write arms the
                    # writer whenever a buffer is left over).
                    self.loop.add_writer(fd, self.write_callback)
                    return
                self.offset += sent
                if self.offset < len(self.buf):
                    return
                self.buf = None
                if self.fut is not None and not self.fut.done():
                    self.fut.set_result(None)
        except Exception as e:  # noqa: BLE001 - as dbus-fast: any other failure ends the connection
            if self.fut is not None and not self.fut.done():
                if self.bus._user_disconnect:
                    self.fut.set_result(None)
                else:
                    self.fut.set_exception(e)
            self.bus._finalize(e)


_REPLIES = (MessageType.METHOD_RETURN, MessageType.ERROR)


class Bus(MessageBus):
    """A dbus-fast bus with the fixes this service needs (see the module docstring)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(negotiate_unix_fd=True, **kwargs)
        self.credit = ReplyCredit()
        # System service: for a call, which backend objects its caller may see whole (its own,
        # all for root and holders of manage); None: everyone sees everything (session).
        self.backend_view: Callable[[Message], Awaitable[Callable[[Any], bool]]] | None = None
        self._view_tasks: set[asyncio.Task[None]] = set()
        # Called with the unique name of each connection that leaves the bus (the daemon
        # subscribes to those signals once, in Spawner.start).
        self.on_departure: list[Callable[[str], None]] = []
        self.on_call: Callable[[Message], None] | None = None
        # Calls answered straight from the message handler when no waiting is needed
        # (saves dbus-fast's per-call dispatch and a task); None falls back to the method.
        self.fast_paths: dict[_CallKey, Callable[[Message], Message | None]] = {}
        self.add_message_handler(self._intercept)

    async def disconnected(self) -> None:
        """Return (or raise why) once the connection to the bus is gone."""
        await super().wait_for_disconnect()  # type: ignore[no-untyped-call]

    async def connect(self) -> Bus:
        await super().connect()
        if type(self._writer) is _MessageWriter:
            self._writer.__class__ = _PatientWriter
        return self

    def admit_reply(self, peer: str, size: int) -> bool:
        """Queue a reply of ``size`` bytes to ``peer``? See `flow.ReplyCredit`."""
        credit = self.credit
        ok = credit.admit(peer, size)
        if not ok and credit.dropped(peer) == 1:
            log.warning(
                "%s does not read its replies (%d KiB unread): dropping them until it does",
                peer,
                credit.peers[peer].unacked // 1024,
            )
        if credit.want_ping(peer):
            self._loop.call_soon(self._ping, peer)
        return ok

    def _ping(self, peer: str) -> None:
        if self._disconnected:
            return
        ping = Message(destination=peer, path="/", interface=PEER_IFACE, member="Ping")

        def answered(_reply: Message | None, _err: Exception | None) -> None:
            dropped = self.credit.acked(peer)
            if dropped:
                log.info("%s reads its replies again; %d were dropped", peer, dropped)

        self._call(ping, answered)

    def _intercept(self, msg: Message) -> Message | bool:
        if msg.message_type is MessageType.SIGNAL and msg.unix_fds:
            # Anyone may send us a unicast signal carrying fds; nothing here takes them.
            self._close_fds(msg)
        if (
            msg.message_type is MessageType.SIGNAL
            and msg.member == "NameOwnerChanged"
            and msg.sender == "org.freedesktop.DBus"
            and len(msg.body) == 3
            and msg.body[2] == ""
            and msg.body[0].startswith(":")
        ):
            # A connection left the bus: told here, as the signal is read, to everyone who
            # keeps something per connection.
            self.credit.gone(msg.body[0])
            for listener in self.on_departure:
                listener(msg.body[0])
        if msg.message_type is not MessageType.METHOD_CALL:
            return False
        if msg.unix_fds and not self._takes_fds(msg):
            # dbus-fast hands fds only to handlers that take them: close the rest here.
            self._close_fds(msg)
        current_message.set(msg)
        if self.on_call is not None:
            self.on_call(msg)
        if self.backend_view is not None and self._answer_with_view(msg):
            return True
        if (
            msg.path is not None
            and msg.path.startswith(BACKEND_PREFIX)
            and msg.path not in self._path_exports
            and msg.interface not in (INTROSPECTABLE_IFACE, PEER_IFACE)
        ):
            # A backend that never was or is gone: say so in the project's words, not with
            # dbus-fast's UnknownMethod/UnknownObject.
            return Message.new_error(
                msg,
                ERROR_PREFIX + "NotFound",
                bounded(f"no backend {msg.path[len(BACKEND_PREFIX) :]}", 256),
            )
        fast = self.fast_paths.get((msg.path, msg.interface, msg.member, msg.signature))
        if fast is not None:
            reply = fast(msg)
            if reply is not None:
                return reply  # dbus-fast sends a returned Message as the reply
        return False

    def _answer_with_view(self, msg: Message) -> bool:
        """GetManagedObjects and a backend's Properties.Get/GetAll, answered per caller."""
        if (
            msg.interface == OBJECT_MANAGER_IFACE
            and msg.member == "GetManagedObjects"
            and msg.path == MANAGER_PATH
        ):
            work = self._managed_objects(msg)
        elif (
            msg.interface == PROPERTIES_IFACE
            and msg.member in ("Get", "GetAll")
            and msg.path is not None
            and msg.path.startswith(BACKEND_PREFIX)
            and msg.path in self._path_exports
            and msg.body
            and msg.body[0] == BACKEND_IFACE
        ):
            work = self._backend_properties(msg)
        else:
            return False
        task = asyncio.ensure_future(self._reply_with(msg, work))
        self._view_tasks.add(task)
        task.add_done_callback(self._view_tasks.discard)
        return True

    async def _reply_with(self, msg: Message, work: Awaitable[Message]) -> None:
        try:
            reply = await work
        except DBusError as e:
            reply = Message.new_error(msg, e.type, bounded(e.text))
        except Exception as e:  # noqa: BLE001 - a bug here must not leave the call unanswered
            log.exception("answering %s.%s for %s", msg.interface, msg.member, msg.sender)
            reply = Message.new_error(
                msg, "org.freedesktop.DBus.Error.Failed", f"internal error: {type(e).__name__}"
            )
        if not self._disconnected:
            self.send(reply)

    async def _managed_objects(self, msg: Message) -> Message:
        assert self.backend_view is not None
        whole = await self.backend_view(msg)
        result: dict[str, dict[str, dict[str, Variant]]] = {}
        for path, interfaces in list(self._path_exports.items()):
            if not path.startswith(MANAGER_PATH + "/"):
                continue
            entry: dict[str, dict[str, Variant]] = {}
            for name, interface in interfaces.items():
                variants = getattr(interface, "variants", None)
                if variants is None:
                    continue
                props: dict[str, Variant] = variants()
                if name == BACKEND_IFACE and not whole(interface):
                    props = public_backend(props)
                entry[name] = props
            result[path] = entry
        return Message.new_method_return(msg, "a{oa{sa{sv}}}", [result])

    async def _backend_properties(self, msg: Message) -> Message:
        assert self.backend_view is not None and msg.path is not None
        whole = await self.backend_view(msg)
        backend_id = msg.path[len(BACKEND_PREFIX) :]
        interface = self._path_exports.get(msg.path, {}).get(BACKEND_IFACE)
        if interface is None:  # gone meanwhile
            return Message.new_error(msg, ERROR_PREFIX + "NotFound", f"no backend {backend_id}")
        props: dict[str, Variant] = interface.variants()  # type: ignore[attr-defined]
        if not whole(interface):
            if msg.member == "Get" and msg.body[1] in PRIVATE_BACKEND_PROPERTIES:
                raise error(
                    "NotAuthorized",
                    f"{msg.body[1]} of backend {backend_id}, another user's, is visible to its "
                    "owner and to holders of org.vhostuserd.manage only",
                )
            props = public_backend(props)
        if msg.member == "GetAll":
            return Message.new_method_return(msg, "a{sv}", [props])
        name = msg.body[1]
        if name not in props:
            return Message.new_error(
                msg,
                "org.freedesktop.DBus.Error.UnknownProperty",
                bounded(f"{BACKEND_IFACE} has no property {name}", 512),
            )
        return Message.new_method_return(msg, "v", [props[name]])

    @staticmethod
    def _close_fds(msg: Message) -> None:
        for fd in msg.unix_fds:
            os.close(fd)
        msg.unix_fds = []

    def _takes_fds(self, msg: Message) -> bool:
        """Listed in FD_TAKING_CALLS and exported: else no handler would own the fds."""
        path, name = msg.path, msg.interface
        if (
            path is None
            or name is None
            or (path, name, msg.member, msg.signature) not in FD_TAKING_CALLS
        ):
            return False
        interface = self._path_exports.get(path, {}).get(name)
        return interface is not None and any(
            m.name == msg.member and m.in_signature == msg.signature and not m.disabled
            for m in ServiceInterface._get_methods(interface)
        )

    def _emit_interface_added(self, path: str, interface: ServiceInterface) -> None:
        if self._disconnected:
            return
        variants = getattr(interface, "variants", None)
        if variants is None:
            super()._emit_interface_added(path, interface)
            return
        props = variants()
        if self.backend_view is not None and interface.name == BACKEND_IFACE:
            props = public_backend(props)  # a broadcast: everyone receives it
        self.send(
            Message.new_signal(
                path=_manager_for(path),
                interface=OBJECT_MANAGER_IFACE,
                member="InterfacesAdded",
                signature="oa{sa{sv}}",
                body=[path, {interface.name: props}],
            )
        )

    def _emit_interface_removed(self, path: str, removed_interfaces: list[str]) -> None:
        if self._disconnected:
            return
        self.send(
            Message.new_signal(
                path=_manager_for(path),
                interface=OBJECT_MANAGER_IFACE,
                member="InterfacesRemoved",
                signature="oas",
                body=[path, removed_interfaces],
            )
        )


def public_backend(props: dict[str, Variant]) -> dict[str, Variant]:
    """A backend's properties without the private ones (PRIVATE_BACKEND_PROPERTIES)."""
    return {k: v for k, v in props.items() if k not in PRIVATE_BACKEND_PROPERTIES}


def _manager_for(path: str) -> str:
    return MANAGER_PATH if path.startswith(MANAGER_PATH + "/") else path


def descriptor_variants(
    d: Descriptor, caps: ProbeResult | None, path: str | None
) -> dict[str, Variant]:
    """The ListDescriptors/Resolve dict of docs/contract.md section 3."""
    out = {
        "name": Variant("s", d.name),
        "path": Variant("s", d.path),
        "tier": Variant("s", d.tier),
        "type": Variant("s", d.type),
        "description": Variant("s", d.description),
        "binary": Variant("s", d.binary),
        "tags": Variant("as", list(d.tags)),
    }
    if isinstance(caps, Capabilities):
        out["features"] = Variant("as", list(caps.features))
    elif isinstance(caps, ProbeError):
        out["probe_error"] = Variant("s", str(caps))
    if path is not None:
        out["object"] = Variant("o", path)
    return out


class DescriptorObject(ServiceInterface):
    """One effective descriptor, at /org/vhostuserd/Broker1/descriptor/<escaped name>."""

    def __init__(self, descriptor: Descriptor) -> None:
        super().__init__(DESCRIPTOR_IFACE)
        self.descriptor = descriptor
        self.path = descriptor_path(descriptor.name)
        self.caps: ProbeResult | None = None
        self._dict: dict[str, Variant] | None = None

    def as_dict(self) -> dict[str, Variant]:
        if self._dict is None:
            self._dict = descriptor_variants(self.descriptor, self.caps, self.path)
        return self._dict

    def variants(self) -> dict[str, Variant]:
        d = self.descriptor
        caps = self.caps
        return {
            "Name": Variant("s", d.name),
            "Path": Variant("s", d.path),
            "Tier": Variant("s", d.tier),
            "Type": Variant("s", d.type),
            "Description": Variant("s", d.description),
            "Binary": Variant("s", d.binary),
            "Tags": Variant("as", list(d.tags)),
            "Probed": Variant("b", caps is not None),
            "Features": Variant(
                "as", list(caps.features) if isinstance(caps, Capabilities) else []
            ),
            "ProbeError": Variant("s", str(caps) if isinstance(caps, ProbeError) else ""),
        }

    def update(self, descriptor: Descriptor | None = None, caps: ProbeResult | None = None) -> None:
        before = self.variants()
        if descriptor is not None:
            self.descriptor = descriptor
        self.caps = caps
        self._dict = None
        after = self.variants()
        changed = {k: v.value for k, v in after.items() if before[k] != v}
        if changed:
            self.emit_properties_changed(changed)

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> "s":
        return self.descriptor.name

    @dbus_property(access=PropertyAccess.READ)
    def Path(self) -> "s":
        return self.descriptor.path

    @dbus_property(access=PropertyAccess.READ)
    def Tier(self) -> "s":
        return self.descriptor.tier

    @dbus_property(access=PropertyAccess.READ)
    def Type(self) -> "s":
        return self.descriptor.type

    @dbus_property(access=PropertyAccess.READ)
    def Description(self) -> "s":
        return self.descriptor.description

    @dbus_property(access=PropertyAccess.READ)
    def Binary(self) -> "s":
        return self.descriptor.binary

    @dbus_property(access=PropertyAccess.READ)
    def Tags(self) -> "as":
        return list(self.descriptor.tags)

    @dbus_property(access=PropertyAccess.READ)
    def Probed(self) -> "b":
        return self.caps is not None

    @dbus_property(access=PropertyAccess.READ)
    def Features(self) -> "as":
        return list(self.caps.features) if isinstance(self.caps, Capabilities) else []

    @dbus_property(access=PropertyAccess.READ)
    def ProbeError(self) -> "s":
        return str(self.caps) if isinstance(self.caps, ProbeError) else ""


class Manager(ServiceInterface):
    """org.vhostuserd.Broker1.Manager at /org/vhostuserd/Broker1."""

    def __init__(self, broker: Broker) -> None:
        super().__init__(MANAGER_IFACE)
        self.broker = broker

    @method()
    def ListDescriptors(self, type: "s") -> "aa{sv}":
        objs = self.broker.objects
        return [
            objs[d.name].as_dict() for d in self.broker.index.descriptors if type in ("", d.type)
        ]

    @method()
    async def Resolve(self, type: "s", features: "as") -> "oa{sv}":
        d = await self.broker.resolve(type, features)
        obj = self.broker.objects[d.name]
        return [obj.path, obj.as_dict()]

    @method()
    async def GetCapabilities(self, name: "s") -> "s":
        return await self.broker.capabilities(name)

    @method()
    async def Spawn(self, name: "s", options: "a{sv}", socket: "h") -> "o":
        # 'h' is an index into the fds the call carries. dbus-fast passes the bare index on
        # when the call carries none (it would name one of OUR fds, to be checked, handed to
        # a backend and closed), None when it is out of range, and leaves unnamed fds to us.
        msg = current_message.get()
        received = list(msg.unix_fds)
        index = msg.body[2]
        fd = received[index] if 0 <= index < len(received) else None
        for other in received:
            if other != fd:
                os.close(other)
        msg.unix_fds = []
        if fd is None:
            raise error(
                "InvalidSocket",
                f"the socket argument is fd #{index} of the call, "
                f"which carries {len(received)} fd(s)",
            )
        return await self.broker.spawner.spawn(name, options, fd)

    @method()
    async def ListBackends(self) -> "aa{sv}":
        return await self.broker.spawner.list_backends()

    @method()
    async def Reload(self) -> "t":
        msg = current_message.get()
        caller = await self.broker.spawner.caller(msg.sender)
        await self.broker.spawner.authority.check(
            msg, caller.uid, "org.vhostuserd.manage", {"request": "reload"}
        )
        self.broker.reload()
        return self.broker.index.generation

    @dbus_property(access=PropertyAccess.READ)
    def Generation(self) -> "t":
        return self.broker.index.generation

    @dbus_property(access=PropertyAccess.READ)
    def SearchPath(self) -> "as":
        return [d.path for d in self.broker.index.dirs]

    @dbus_property(access=PropertyAccess.READ)
    def Diagnostics(self) -> "a(sss)":
        return [list(d.as_tuple()) for d in self.broker.diagnostics]

    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> "s":
        return __version__

    @dbus_property(access=PropertyAccess.READ)
    def Cgroups(self) -> "s":
        """How backends are placed: "delegated: PATH (...)", "nested: ..." or "off: why"."""
        return self.broker.spawner.supervisor.cgroups.describe()

    @signal()
    def IndexChanged(self, generation: int) -> "t":
        return generation


class Broker:
    """Wires the index and the probe cache to the exported objects."""

    def __init__(self, bus: Bus, index: Index, probes: ProbeCache) -> None:
        self.bus = bus
        self.index = index
        self.probes = probes
        self.manager = Manager(self)
        self.objects: dict[str, DescriptorObject] = {}
        self._probe_tasks: set[asyncio.Task[None]] = set()
        self._idle: asyncio.Event | None = None
        self._logged: set[tuple[str, str, str]] = set()
        self.spawner: Spawner  # set by the daemon once the supervisor exists

    def export(self) -> None:
        self.bus.fast_paths[(MANAGER_PATH, MANAGER_IFACE, "Resolve", "sas")] = self._resolve_now
        self.bus.export(MANAGER_PATH, self.manager)
        for d in self.index.descriptors:
            self._add(d)

    # ---- index changes

    def _add(self, d: Descriptor) -> None:
        obj = DescriptorObject(d)
        obj.caps = self.cached_caps(d)
        self.objects[d.name] = obj
        self.bus.export(obj.path, obj)
        if obj.caps is None:
            self._probe_later(d)

    def _probe_later(self, d: Descriptor) -> None:
        task = asyncio.ensure_future(self._probe(d))
        self._probe_tasks.add(task)
        task.add_done_callback(self._probe_done)

    def _probe_done(self, task: asyncio.Task[None]) -> None:
        self._probe_tasks.discard(task)
        self.maybe_idle()

    async def _probe(self, d: Descriptor) -> None:
        result = await self.probe_caps(d)
        obj = self.objects.get(d.name)
        if obj is not None and obj.descriptor == d:
            obj.update(caps=result)
            if isinstance(result, ProbeError):
                log.warning("%s: probe of %s failed: %s", d.path, d.binary, result)

    def on_change(self, change: Change) -> None:
        for d in change.removed:
            obj = self.objects.pop(d.name)
            self.bus.unexport(obj.path, obj)
            log.info("descriptor removed: %s", d.path)
        for d in change.added:
            self._add(d)
            log.info("descriptor added: %s (%s, %s)", d.path, d.type, d.binary)
        for d in change.changed:
            obj = self.objects[d.name]
            caps = self.cached_caps(d)
            obj.update(descriptor=d, caps=caps)
            if caps is None:
                self._probe_later(d)
            log.info("descriptor changed: %s", d.path)
        if change.diagnostics_changed:
            diags = self.diagnostics
            self.manager.emit_properties_changed(
                {"Diagnostics": [list(x.as_tuple()) for x in diags]}
            )
            self.log_new_diagnostics(diags)
        if change.effective:
            self.manager.emit_properties_changed({"Generation": self.index.generation})
            self.manager.IndexChanged(self.index.generation)

    def log_new_diagnostics(self, diags: tuple[Diagnostic, ...]) -> None:
        """A diagnostic that is new or changed is logged once, at warning: a broken file that
        shadows a name must not go unnoticed (one that is fixed and broken again is new)."""
        current = {d.as_tuple() for d in diags}
        for diag in diags:
            if diag.as_tuple() not in self._logged:
                log.warning("%s", diag)
        self._logged = current

    def reload(self) -> None:
        self.on_change(self.index.rescan())

    @property
    def diagnostics(self) -> tuple[Diagnostic, ...]:
        """The index's, plus (system service) descriptors whose binary it will not run."""
        untrusted = self.probes.untrusted
        if untrusted is None:
            return self.index.diagnostics
        extra = []
        for d in self.index.descriptors:
            why = untrusted(d.binary)
            if why is not None:
                extra.append(
                    Diagnostic(d.path, "error", f"/binary: not run by the system service: {why}")
                )
        return self.index.diagnostics + tuple(extra)

    @property
    def busy(self) -> bool:
        return bool(self._probe_tasks) or self.spawner.busy

    def maybe_idle(self) -> None:
        """Something that kept the daemon busy ended: wake `wait_idle` if nothing else does."""
        if self._idle is not None and not self.busy:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once nothing keeps the daemon busy (no backend, no probe). Waits on an event,
        not a timer: a daemon supervising backends all day wakes for nothing."""
        while self.busy:
            self._idle = asyncio.Event()
            try:
                await self._idle.wait()
            finally:
                self._idle = None

    # ---- queries

    def _named(self, name: str) -> Descriptor:
        d = self.index.get(name)
        if d is None:
            raise error("NotFound", f"{name}: no such descriptor in the effective index")
        return d

    def cached_caps(self, d: Descriptor) -> ProbeResult | None:
        """An adapter's static capabilities (`adapters`: never probed), else the probe cache's."""
        static = d.static_capabilities
        return static if static is not None else self.probes.cached(d.binary, d.type)

    async def probe_caps(self, d: Descriptor) -> ProbeResult:
        static = d.static_capabilities
        return static if static is not None else await self.probes.get(d.binary, d.type)

    async def caps_for(self, d: Descriptor) -> ProbeResult:
        result = await self.probe_caps(d)
        obj = self.objects.get(d.name)
        if obj is not None and obj.descriptor == d and obj.caps != result:
            obj.update(caps=result)
        return result

    def _resolve_now(self, msg: Message) -> Message | None:
        """Resolve without waiting, when every candidate's capabilities are known."""
        btype, features = msg.body
        if (why := features_error(features)) is not None:
            return Message.new_error(msg, ERROR_PREFIX + "LimitsExceeded", f"Resolve: {why}")
        probed: dict[str, ProbeResult] = {}
        if features:
            for d in self.index.descriptors:
                if d.type == btype:
                    result = self.cached_caps(d)
                    if result is None:
                        return None  # a probe is needed: the async method waits for it
                    probed[d.name] = result
        resolution = resolve(self.index.descriptors, btype, features, lambda d: probed.get(d.name))
        if resolution.chosen is None or resolution.chosen.name not in self.objects:
            return Message.new_error(
                msg, ERROR_PREFIX + "NotFound", bounded(resolution.explain(btype, features))
            )
        obj = self.objects[resolution.chosen.name]
        return Message.new_method_return(msg, "oa{sv}", [obj.path, obj.as_dict()])

    async def resolve(self, btype: str, features: list[str]) -> Descriptor:
        if (why := features_error(features)) is not None:
            raise error("LimitsExceeded", f"Resolve: {why}")
        descriptors = self.index.descriptors
        probed: dict[str, ProbeResult] = {}
        if features:
            candidates = [d for d in descriptors if d.type == btype]
            results = await asyncio.gather(*(self.caps_for(d) for d in candidates))
            probed = {d.name: r for d, r in zip(candidates, results, strict=True)}
            descriptors = self.index.descriptors  # the index may have moved on meanwhile
        resolution = resolve(descriptors, btype, features, lambda d: probed.get(d.name))
        if resolution.chosen is None or resolution.chosen.name not in self.objects:
            raise error("NotFound", resolution.explain(btype, features))
        return resolution.chosen

    async def capabilities(self, name: str) -> str:
        d = self._named(name)
        result = await self.caps_for(d)
        if isinstance(result, ProbeError):
            raise error("ProbeFailed", f"{name}: {d.binary} --print-capabilities failed: {result}")
        return result.json
