"""The bus connection and its fixes: what every exported object of the service relies on.

dbus-fast, as this service needs it: ObjectManager signals sent from the manager's path
(dbus-fast sends them from the object's own), the calling message made available to handlers
(`current_message`), received fds closed for every call that does not take them, a writer that
waits out a full socket instead of dropping the connection, the reply credit per peer (`flow`),
departures told once to whoever keeps something per connection, and the per-caller view of
other users' backends on the system service. Error replies are cut to MAX_ERROR_CHARS.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import contextvars
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.aio.message_bus import _MessageWriter
from dbus_fast.errors import DBusError
from dbus_fast.service import ServiceInterface

from vhostuserd.core.errors import BrokerError, Err
from vhostuserd.core.fields import PRIVATE_BACKEND_PROPERTIES
from vhostuserd.core.flow import ReplyCredit
from vhostuserd.core.names import (
    BACKEND_IFACE,
    BACKEND_PREFIX,
    INTROSPECTABLE_IFACE,
    MANAGER_IFACE,
    MANAGER_PATH,
    OBJECT_MANAGER_IFACE,
    PEER_IFACE,
    PROPERTIES_IFACE,
)

log = logging.getLogger("vhostuserd.service")


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


def dbus_error(e: BrokerError) -> DBusError:
    """What the core and the edges raise, as the D-Bus error a caller receives: the one place
    the service builds its D-Bus errors, their messages cut to size."""
    return DBusError(e.dbus_name, bounded(str(e)))


def error(name: Err, message: str) -> DBusError:
    """The D-Bus error ``name`` with ``message`` (`dbus_error`), for the bus's own refusals."""
    return dbus_error(BrokerError(name, message))


def error_reply(msg: Message, name: Err, message: str) -> Message:
    """`error`, as the reply to ``msg``: for the handlers that answer with a message."""
    e = error(name, message)
    return Message.new_error(msg, e.type, e.text)


@contextlib.contextmanager
def replying_errors() -> Iterator[None]:
    """Around a handler's work: a `BrokerError` raised inside leaves as its D-Bus error (what
    dbus-fast sends back to the caller; any other exception is a bug, a generic error)."""
    try:
        yield
    except BrokerError as e:
        raise dbus_error(e) from None


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
            return error_reply(
                msg, Err.NOT_FOUND, bounded(f"no backend {msg.path[len(BACKEND_PREFIX) :]}", 256)
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
            with replying_errors():
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
            return error_reply(msg, Err.NOT_FOUND, f"no backend {backend_id}")
        props: dict[str, Variant] = interface.variants()  # type: ignore[attr-defined]
        if not whole(interface):
            if msg.member == "Get" and msg.body[1] in PRIVATE_BACKEND_PROPERTIES:
                raise error(
                    Err.NOT_AUTHORIZED,
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
        self._object_manager_signal(path, "InterfacesAdded", "oa{sa{sv}}", {interface.name: props})

    def _emit_interface_removed(self, path: str, removed_interfaces: list[str]) -> None:
        if self._disconnected:
            return
        self._object_manager_signal(path, "InterfacesRemoved", "oas", removed_interfaces)

    def _object_manager_signal(self, path: str, member: str, signature: str, what: Any) -> None:
        """An ObjectManager signal about ``path``, sent from its manager's path."""
        self.send(
            Message.new_signal(
                path=_manager_for(path),
                interface=OBJECT_MANAGER_IFACE,
                member=member,
                signature=signature,
                body=[path, what],
            )
        )


def public_backend(props: dict[str, Variant]) -> dict[str, Variant]:
    """A backend's properties without the private ones (PRIVATE_BACKEND_PROPERTIES)."""
    return {k: v for k, v in props.items() if k not in PRIVATE_BACKEND_PROPERTIES}


def _manager_for(path: str) -> str:
    return MANAGER_PATH if path.startswith(MANAGER_PATH + "/") else path
