"""The backend half of the service: Spawn, Backend objects, and whose backend is whose.

Owns what happens between a Spawn call and a supervised process: the received socket is
checked (a connected or listening AF_UNIX stream socket, as the backend needs) and closed
on every path, the caller is identified by the bus alone, quotas are applied, and the
backend is tied to the caller's unique name (stopped when it leaves the bus, unless
detached). Process work is `supervisor`'s; option checking is `options`'.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import shlex
import socket
import stat
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from dbus_fast import Message, MessageType, Variant
from dbus_fast.errors import DBusError
from dbus_fast.service import method, signal

from vhostuserd.bus.connection import Bus, current_message, error
from vhostuserd.bus.properties import FieldObject
from vhostuserd.core import extras
from vhostuserd.core.descriptors import Capabilities, Descriptor, ProbeResult
from vhostuserd.core.fields import BACKEND_FIELDS, BackendView
from vhostuserd.core.index import Index
from vhostuserd.core.lifecycle import Event, Transition
from vhostuserd.core.names import BACKEND_IFACE, BACKEND_PREFIX
from vhostuserd.core.options import SpawnPlan, plan, socket_kind_error
from vhostuserd.core.optiontable import OPTIONS, OptionError
from vhostuserd.edges import cgroup, settings, userns
from vhostuserd.edges.authority import (
    MANAGE,
    SPAWN,
    SPAWN_DEVICE,
    Authority,
    CallTarget,
    RunAs,
    caller_app_id,
    check_device,
    run_as,
    untrusted_reason,
)
from vhostuserd.edges.supervisor import Backend, SpawnError, Supervisor


class BrokerView(Protocol):
    """What the Spawner needs of the broker (`manager.Broker`): its bus, the index, the
    capabilities of a descriptor, and being told when it may go idle."""

    bus: Bus
    index: Index

    async def caps_for(self, d: Descriptor) -> ProbeResult: ...

    def maybe_idle(self) -> None: ...


log = logging.getLogger("vhostuserd.backends")

LINGER_S = 3.0
DEPARTURES = (
    "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
    "member='NameOwnerChanged',arg2=''"
)
DBUS: CallTarget = {
    "destination": "org.freedesktop.DBus",
    "path": "/org/freedesktop/DBus",
    "interface": "org.freedesktop.DBus",
}
_O_PATH = getattr(os, "O_PATH", 0o10000000)


def _error(name: str, message: str) -> Exception:
    return error(name, message)


@dataclass
class Respawn:
    """A listening backend's restart budget (options.conf ``respawn = N T``) and what a
    restart needs: our duplicate of the listening socket and the spawn's arguments."""

    limit: int
    window_s: int
    fd: int
    spawn: dict[str, Any]
    idmap: userns.IdMap | None
    prefix: tuple[str, ...]
    times: deque[float] = field(default_factory=deque)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(frozen=True)
class Caller:
    """Who is calling, from the bus's own records: never from the call's arguments."""

    name: str
    uid: int
    pid: int


def check_socket(fd: int) -> bool:
    """Validate a received socket fd; returns whether it is listening. Raises InvalidSocket."""
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        st = os.fstat(fd)
    except OSError as e:
        raise _error(
            "InvalidSocket", f"the socket argument is not a usable fd: {e.strerror}"
        ) from None
    if flags & _O_PATH:
        raise _error("InvalidSocket", "the socket argument is an O_PATH fd; pass the socket itself")
    if not stat.S_ISSOCK(st.st_mode):
        kind = "a pipe" if stat.S_ISFIFO(st.st_mode) else "not a socket"
        raise _error(
            "InvalidSocket",
            f"the socket argument is {kind}; an AF_UNIX SOCK_STREAM socket is needed",
        )
    try:
        domain = socket.socket(fileno=os.dup(fd))
    except OSError as e:
        raise _error(
            "InvalidSocket", f"the socket argument cannot be inspected: {e.strerror}"
        ) from None
    try:
        family = domain.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
        stype = domain.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        listening = bool(domain.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        try:
            connected = not listening and domain.getpeername() is not None
        except OSError:
            connected = False
    finally:
        domain.close()
    if family != socket.AF_UNIX:
        raise _error(
            "InvalidSocket", f"the socket argument is of family {family}; AF_UNIX is needed"
        )
    if stype != socket.SOCK_STREAM:
        kinds: dict[int, str] = {
            socket.SOCK_DGRAM: "SOCK_DGRAM",
            socket.SOCK_SEQPACKET: "SOCK_SEQPACKET",
        }
        name = kinds.get(stype, str(stype))
        raise _error(
            "InvalidSocket", f"the socket argument is {name}; vhost-user needs SOCK_STREAM"
        )
    if not listening and not connected:
        raise _error(
            "InvalidSocket",
            "the socket argument is neither connected nor listening; pass one "
            "end of a socketpair or a bound, listening socket, as the backend needs",
        )
    return listening


class BackendObject(FieldObject):
    """One backend, at /org/vhostuserd/Broker1/backend/<id>: its properties are
    `BACKEND_FIELDS`, its state its life cycle's (`core.lifecycle`)."""

    fields = BACKEND_FIELDS

    def __init__(self, spawner: Spawner, backend: Backend) -> None:
        super().__init__(BACKEND_IFACE)
        self.spawner = spawner
        self.b = backend  # the current process: a respawn replaces it (`Spawner.on_change`)
        self.id = backend.life.id  # the object's, kept across respawns
        self.path = BACKEND_PREFIX + self.id
        self.respawn: Respawn | None = None

    def model(self) -> BackendView:
        supervisor = self.spawner.supervisor
        return BackendView(
            self.b, supervisor.cgroups.relative(self.b.cgroup), supervisor.usage(self.b)
        )

    @method()
    async def Stop(self) -> "":
        await self.spawner.stop_call(self)

    @method()
    async def GetLog(self) -> "s":
        await self.spawner.may_manage(self.b, "read its log")
        return bytes(self.b.log).decode("utf-8", "replace")

    @signal()
    def Exited(self, status: int, sig: int) -> "ii":
        return [status, sig]

    @signal()
    def Respawned(self, restarts: int) -> "u":
        return restarts


class Spawner:
    """Spawn, ListBackends and Stop for the Manager, with client lifetime tracking."""

    def __init__(
        self,
        broker: BrokerView,
        supervisor: Supervisor,
        authority: Authority,
        *,
        system: bool,
        max_per_uid: int,
        max_total: int,
    ) -> None:
        self.broker = broker
        self.authority = authority
        self.bus = broker.bus
        self.supervisor = supervisor
        self.system = system
        self.max_per_uid = max_per_uid
        self.max_total = max_total
        self.objects: dict[str, BackendObject] = {}
        self._owners: dict[str, set[str]] = {}
        self._callers: dict[str, Caller] = {}
        self._departed: OrderedDict[str, None] = OrderedDict()
        # Callers with a Spawn in progress, and those of them that left the bus meanwhile:
        # exact, however many other connections come and go (the record above is bounded).
        self._spawning: Counter[str] = Counter()
        self._left_mid_spawn: set[str] = set()
        self.bus.on_departure.append(self._on_departure)

    # ---- bus helpers

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
        known = self._callers.get(sender)
        if known is not None:
            return known
        try:
            (creds,) = await self._dbus("GetConnectionCredentials", "s", [sender])
        except LookupError as e:
            raise _error("NotAuthorized", f"cannot identify the caller {sender}: {e}") from None
        caller = Caller(
            sender,
            int(creds["UnixUserID"].value),
            int(creds.get("ProcessID", Variant("u", 0)).value),
        )
        if sender not in self._departed:
            self._callers[sender] = caller
            if len(self._callers) > 4096:
                self._callers.pop(next(iter(self._callers)))
        return caller

    async def name_has_owner(self, name: str) -> bool:
        (has,) = await self._dbus("NameHasOwner", "s", [name])
        return bool(has)

    def _track(self, b: Backend) -> None:
        self._owners.setdefault(b.owner, set()).add(b.life.id)

    def _untrack_id(self, owner: str, backend_id: str) -> None:
        ids = self._owners.get(owner)
        if ids is not None:
            ids.discard(backend_id)
            if not ids:
                del self._owners[owner]

    def _on_departure(self, name: str) -> None:
        self._callers.pop(name, None)
        self._departed[name] = None
        if name in self._spawning:
            self._left_mid_spawn.add(name)
        if len(self._departed) > 8192:
            self._departed.popitem(last=False)
        if name in self._owners:
            self.owner_gone(name)

    def owner_gone(self, name: str) -> None:
        for backend_id in list(self._owners.get(name, ())):
            obj = self.objects.get(backend_id)
            if obj is not None and not obj.b.detached and obj.b.life.alive:
                log.info("backend %s: its owner %s left the bus; stopping it", backend_id, name)
                self.supervisor.stop(obj.b, Event.OWNER_LEFT)

    # ---- authorization

    async def may_manage(self, b: Backend, verb: str) -> None:
        """The owner uid and root may act on a backend; others need org.vhostuserd.manage."""
        msg = current_message.get()
        caller = await self.caller(msg.sender)
        if caller.uid in (0, b.owner_uid):
            return
        details = {
            "descriptor": b.descriptor,
            "binary": b.binary,
            "backend": b.id,
            "owner-uid": str(b.owner_uid),
        }
        if not await self.authority.allowed(msg, caller.uid, MANAGE, details):
            raise _error(
                "NotAuthorized",
                f"{MANAGE}: backend {b.id} belongs to uid {b.owner_uid}; "
                f"uid {caller.uid} may not {verb}",
            )

    async def authorize_spawn(
        self, msg: Message, caller: Caller, d: Any, p: SpawnPlan, idmap: userns.IdMap | None = None
    ) -> RunAs:
        """polkit for the system service; returns the identity the backend will run as."""
        if self.system and (why := untrusted_reason(d.binary)) is not None:
            raise _error(
                "NotAuthorized",
                f"{d.name}: its binary cannot be trusted by the system service: {why}",
            )
        device_gids: list[int] = []
        for option, value in p.device_paths.items():
            device_gids.append(check_device(option, value)[1].st_gid)
        details = {"descriptor": d.name, "type": d.type, "binary": d.binary}
        for key in ("render-node", "evdev-path", "shared-dir", "blk-file"):
            if key in p.values:
                details[key] = str(p.values[key])
        if idmap is not None:
            details["idmap"] = idmap.mode  # the mode in effect, asked for or not
        for key, value in p.values.items():  # the admin-vetted extra options (`extras`)
            if key not in details and key not in OPTIONS:
                flag = isinstance(value, bool)
                details[key] = ("true" if value else "false") if flag else str(value)
        if p.extra_args:
            details["extra-args"] = shlex.join(p.extra_args)
        if self.authority.consults_polkit(caller.uid):
            # Only polkit reads it, and looking it up costs a thread (see caller_app_id).
            app = await caller_app_id(caller.pid)
            if app:
                details["flatpak-app-id"] = app
        await self.authority.check(msg, caller.uid, SPAWN, details)
        if device_gids:
            await self.authority.check(msg, caller.uid, SPAWN_DEVICE, details)
        return run_as(caller.uid, tuple(device_gids), system=self.system)

    def _userns_map(self, d: Any, p: SpawnPlan, caller: Caller) -> userns.IdMap | None:
        """Whether this backend runs in a user namespace, and its id map (`userns`)."""
        try:
            return userns.plan_for(
                system=self.system,
                dtype=d.type,
                name=d.name,
                requested=p.values.get("idmap"),
                uid=caller.uid,
                sysconfdir=userns.sysconfdir_of(self.broker.index.dirs),
            )
        except userns.UsernsError as e:
            raise _error(e.kind, str(e)) from None

    # ---- methods

    async def spawn(self, name: str, options: dict[str, Variant], fd: int) -> str:
        msg = current_message.get()
        sender = msg.sender
        self._spawning[sender] += 1
        try:
            return await self._spawn(msg, name, options, fd)
        finally:
            self._spawning[sender] -= 1
            if not self._spawning[sender]:
                del self._spawning[sender]
                self._left_mid_spawn.discard(sender)

    def _left(self, name: str) -> bool:
        """Has the caller ``name`` left the bus? Exact for a caller with a Spawn in progress
        (a departure before the call's task ran is still in the recent-departures record:
        one read of the socket cannot carry 8,192 of them)."""
        return name in self._left_mid_spawn or name in self._departed

    async def _spawn(self, msg: Message, name: str, options: dict[str, Variant], fd: int) -> str:
        try:
            listening = check_socket(fd)
            d = self.broker.index.get(name)
            if d is None:
                raise _error("NotFound", f"{name}: no such descriptor in the effective index")
            raw = {k: (v.signature, v.value) for k, v in options.items()}
            caps = None
            if any(k not in ("detach", "settle-ms") for k in raw) or d.type == "fs":
                result = await self.broker.caps_for(d)
                caps = result if isinstance(result, Capabilities) else None
            try:
                config, conf_path = settings.load_options(
                    userns.sysconfdir_of(self.broker.index.dirs)
                )
                vetted = extras.extras_for(d.type, d.name, config, conf_path)
            except extras.ExtrasError as e:
                raise _error(e.kind, f"{d.name}: {e}") from None
            try:
                p = plan(d, caps, raw, vetted)
                if p.device_paths:  # checked, then resolved: polkit and the backend see the device
                    resolved = {k: ("s", check_device(k, v)[0]) for k, v in p.device_paths.items()}
                    p = plan(d, caps, {**raw, **resolved}, vetted)
            except OptionError as e:
                raise _error(e.kind, str(e)) from None
            why = socket_kind_error(d, listening)
            if why is not None:
                raise _error("InvalidSocket", why)
            caller = await self.caller(msg.sender)
            idmap = self._userns_map(d, p, caller)
            identity = await self.authorize_spawn(msg, caller, d, p, idmap)
            if self.supervisor.count() >= self.max_total:
                raise _error(
                    "QuotaExceeded",
                    f"{self.max_total} backends are running, the most this daemon runs",
                )
            if self.supervisor.count(caller.uid) >= self.max_per_uid:
                raise _error(
                    "QuotaExceeded",
                    f"uid {caller.uid} already runs {self.max_per_uid} backends, its quota",
                )
            # The caller may have left while we waited (for polkit, say): then nothing starts
            # (the CVE-2021-3560 class of bug). From here to tracking there is no await, so a
            # departure not seen yet is handled after, by stopping the backend.
            if self._left(caller.name):
                log.info(
                    "Spawn of %s for %s: the caller left the bus; nothing was started",
                    d.name,
                    caller.name,
                )
                raise _error(
                    "SpawnFailed", f"the caller {caller.name} left the bus; nothing was started"
                )
            try:
                limits = cgroup.limits_for(
                    d.type, d.name, userns.sysconfdir_of(self.broker.index.dirs)
                )
                args: dict[str, Any] = {
                    "descriptor": d.name,
                    "argv": p.argv,
                    "owner": caller.name,
                    "owner_uid": caller.uid,
                    "detached": p.detach,
                    "limits": limits,
                }
                with userns.launch(idmap, identity.exec_prefix()) as (prefix, ns_fds):
                    b = self.supervisor.spawn(
                        **args, socket_fd=fd, exec_prefix=prefix, extra_fds=ns_fds
                    )
            except cgroup.LimitsError as e:
                raise _error(e.kind, f"{d.name}: {e}") from None
            except userns.UsernsError as e:
                raise _error(e.kind, f"{d.name}: {e}") from None
            except SpawnError as e:
                raise _error("SpawnFailed", f"{d.name}: {e}") from None
            self._track(b)
            respawn = None
            if vetted.respawn is not None and listening:  # off for connected sockets
                respawn = Respawn(*vetted.respawn, os.dup(fd), args, idmap, identity.exec_prefix())
        finally:
            os.close(fd)
        obj = BackendObject(self, b)
        obj.respawn = respawn
        self.objects[b.id] = obj
        self.bus.export(obj.path, obj)
        try:
            await self.supervisor.settle(b, p.settle_ms)
        except SpawnError as e:
            self._drop(obj)
            raise _error("SpawnFailed", f"{d.name}: {e}") from None
        return obj.path

    async def stop_call(self, obj: BackendObject) -> None:
        await self.may_manage(obj.b, "stop it")
        await self.supervisor.stop(obj.b)

    async def list_backends(self) -> list[dict[str, Variant]]:
        """The caller's own backends; everyone's for root and for holders of manage."""
        msg = current_message.get()
        caller = await self.caller(msg.sender)
        if caller.uid == 0 or (
            any(o.b.owner_uid != caller.uid for o in self.objects.values())
            and await self.authority.allowed(msg, caller.uid, MANAGE, {"list": "all"})
        ):
            return [o.as_dict() for o in self.objects.values()]
        return [o.as_dict() for o in self.objects.values() if o.b.owner_uid == caller.uid]

    async def view_for(self, msg: Message) -> Callable[[Any], bool]:
        """Which backend objects the caller of ``msg`` may see whole: its own; all of them for
        root and for a caller polkit allows org.vhostuserd.manage (asked once per call, only
        when there is another user's backend to see). The rest are seen without
        `core.fields.PRIVATE_BACKEND_PROPERTIES`."""
        caller = await self.caller(msg.sender)
        if caller.uid == 0:
            return lambda _obj: True
        see_all = False
        if any(o.b.owner_uid != caller.uid for o in self.objects.values()):
            try:
                see_all = await self.authority.allowed(msg, caller.uid, MANAGE, {"list": "all"})
            except DBusError:  # LimitsExceeded: too many checks pending; see your own only
                see_all = False
        uid = caller.uid
        return lambda obj: see_all or obj.b.owner_uid == uid

    # ---- supervisor events

    def on_change(self, b: Backend, step: Transition) -> None:
        """Show one step of a backend's life cycle (`core.lifecycle`) on its object."""
        obj = self.objects.get(b.life.id)
        if obj is None:
            return  # not exported yet (spawned, re-adopted), or gone
        if step.event is Event.RESPAWNED:
            obj.b = b  # the new process, in the same life
            obj.emit_properties_changed(obj.values("State", "Restarts"))
            obj.Respawned(b.life.restarts)
            return
        if step.exited_by_itself and self._respawn(obj, b):
            return
        if step.shown_change:
            obj.emit_properties_changed(obj.values("State", "ExitStatus", "ExitSignal"))
        if step.event is Event.EXITED:
            obj.Exited(b.exit_status, b.exit_signal)
            self._untrack_id(b.owner, obj.id)
            asyncio.get_running_loop().call_later(LINGER_S, self._drop, obj)

    def _respawn(self, obj: BackendObject, b: Backend) -> bool:
        """Start a listening backend that exited by itself again on the same socket, if its
        budget allows (options.conf ``respawn = N T``). The new process's `Event.RESPAWNED`
        comes back through `on_change`, which shows it on the object."""
        r = obj.respawn
        if r is None or r.fd < 0:
            return False
        now = time.monotonic()
        while r.times and now - r.times[0] > r.window_s:
            r.times.popleft()
        how = f"status {b.exit_status}" if b.exit_signal < 0 else f"signal {b.exit_signal}"
        if len(r.times) >= r.limit:
            said = (
                f"vhostuserd: backend {obj.id} exited ({how}); respawn limit reached "
                f"({r.limit} restarts in {r.window_s} s): not restarting\n"
            )
            log.warning("%s", said.strip())
            b.log += said.encode()
            r.close()
            return False
        try:
            with userns.launch(r.idmap, r.prefix) as (prefix, ns_fds):
                new = self.supervisor.spawn(
                    **r.spawn, socket_fd=r.fd, exec_prefix=prefix, extra_fds=ns_fds, replacing=b
                )
        except (userns.UsernsError, SpawnError) as e:
            log.warning("backend %s: cannot respawn it: %s", obj.id, e)
            r.close()
            return False
        r.times.append(now)
        log.info(
            "backend %s exited (%s); respawned as pid %d (restart %d of at most %d in %d s)",
            obj.id,
            how,
            new.pid,
            new.life.restarts,
            r.limit,
            r.window_s,
        )
        return True

    def _drop(self, obj: BackendObject) -> None:
        """Its object leaves the bus (the linger time is over, or its Spawn failed)."""
        if self.objects.pop(obj.id, None) is None:
            return  # dropped already: a failed Spawn, then its linger timer
        self.bus.unexport(obj.path, obj)
        if obj.respawn is not None:
            obj.respawn.close()
        self._untrack_id(obj.b.owner, obj.id)
        self.supervisor.remove(obj.b)
        self.broker.maybe_idle()

    def readopt(self) -> None:
        """Take back the recorded backends (before we own our name, so none is missing)."""
        for b in self.supervisor.readopt():
            obj = BackendObject(self, b)
            self.objects[b.id] = obj
            self.bus.export(obj.path, obj)
            if b.exited is None or not b.exited.done():
                self._track(b)

    async def stop_orphans(self) -> None:
        """Stop re-adopted backends whose owner left while we were away. Called once we own
        our name, so that clients matching signals on it see their Exited."""
        for obj in list(self.objects.values()):
            b = obj.b
            if (
                b.adopted
                and not b.detached
                and b.life.alive
                and not await self.name_has_owner(b.owner)
            ):
                log.info(
                    "backend %s: its owner %s left the bus while we were away; stopping it",
                    b.id,
                    b.owner,
                )
                self.supervisor.stop(b, Event.OWNER_LEFT)

    @property
    def busy(self) -> bool:
        return bool(self.objects)
