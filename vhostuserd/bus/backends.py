"""The backend half of the service: Spawn, Backend objects, and whose backend is whose.

Owns what happens between a Spawn call and a supervised process, in the order a handler
goes: the facts are gathered (the received socket's by `edges.sockets`, the caller's uid and
pid from the bus alone, a device's node by `edges.authority`), `core.policy` decides on them
(socket kind, devices, what polkit is asked, quotas, the identity the backend runs as), polkit
is asked (`edges.authority`), and the backend is started and tied to the caller's unique name
(stopped when it leaves the bus, unless detached). The received socket is closed on every
path. Process work is `supervisor`'s; option checking is `options`'."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from dbus_fast import Message, Variant
from dbus_fast.service import method, signal

from vhostuserd.bus.callers import Caller, Callers
from vhostuserd.bus.connection import (
    Bus,
    current_message,
    dbus_error,
    error,
    replying_errors,
)
from vhostuserd.bus.properties import FieldObject
from vhostuserd.core import extras, policy, userns_policy
from vhostuserd.core.descriptors import Capabilities, Descriptor, ProbeResult
from vhostuserd.core.errors import BrokerError, Err
from vhostuserd.core.fields import BACKEND_FIELDS, BackendView
from vhostuserd.core.index import Index
from vhostuserd.core.lifecycle import Event, Transition
from vhostuserd.core.names import BACKEND_IFACE, BACKEND_PREFIX
from vhostuserd.core.options import SpawnPlan, plan
from vhostuserd.core.policy import Quota, RunAs
from vhostuserd.edges import cgroup, settings, userns
from vhostuserd.edges.authority import (
    Authority,
    caller_app_id,
)
from vhostuserd.edges.backend import Backend
from vhostuserd.edges.sockets import socket_facts
from vhostuserd.edges.supervisor import SpawnError, Supervisor
from vhostuserd.edges.trust import check_device, run_as, untrusted_reason


class BrokerView(Protocol):
    """What the Spawner needs of the broker (`manager.Broker`): its bus, the index, the
    capabilities of a descriptor, and being told when it may go idle."""

    bus: Bus
    index: Index

    async def caps_for(self, d: Descriptor) -> ProbeResult: ...

    def maybe_idle(self) -> None: ...


log = logging.getLogger("vhostuserd.backends")

LINGER_S = 3.0


@dataclass
class Respawn:
    """A listening backend's restart budget (options.conf ``respawn = N T``) and what a
    restart needs: our duplicate of the listening socket and the spawn's arguments."""

    limit: int
    window_s: int
    fd: int
    spawn: dict[str, Any]
    idmap: userns_policy.IdMap | None
    prefix: tuple[str, ...]
    times: deque[float] = field(default_factory=deque)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Usage:
    """A backend's `cgroup.Usage`, read from its cgroup when a field first asks for a number:
    most reads of the object (a State change's PropertiesChanged, one property) need none,
    and each costs a few files read."""

    __slots__ = ("_supervisor", "_backend", "_usage")

    def __init__(self, supervisor: Supervisor, backend: Backend) -> None:
        self._supervisor, self._backend = supervisor, backend
        self._usage: cgroup.Usage | None = None

    def __getattr__(self, name: str) -> Any:
        if self._usage is None:
            self._usage = self._supervisor.usage(self._backend)
        return getattr(self._usage, name)


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
        b = self.b
        return BackendView(b, supervisor.cgroups.relative(b.cgroup), _Usage(supervisor, b))

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
        quota: Quota,
    ) -> None:
        self.broker = broker
        self.authority = authority
        self.bus = broker.bus
        self.supervisor = supervisor
        supervisor.on_change = self.on_change  # each step of a backend's life, shown here
        self.system = system
        self.quota = quota
        self.objects: dict[str, BackendObject] = {}
        self._owners: dict[str, set[str]] = {}
        self.callers = Callers(self.bus)
        self.callers.on_departure.append(self._on_departure)

    async def start(self) -> None:
        await self.callers.start()

    async def caller(self, sender: str) -> Caller:
        return await self.callers.caller(sender)

    def _track(self, b: Backend) -> None:
        self._owners.setdefault(b.owner, set()).add(b.life.id)

    def _untrack_id(self, owner: str, backend_id: str) -> None:
        ids = self._owners.get(owner)
        if ids is not None:
            ids.discard(backend_id)
            if not ids:
                del self._owners[owner]

    def _on_departure(self, name: str) -> None:
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
        ask = policy.ask_to_manage(caller.uid, b, verb)
        if ask is None:
            return
        with replying_errors():
            allowed = await self.authority.allowed(msg, caller.uid, ask.action, ask.details)
        if not allowed:
            raise error(Err.NOT_AUTHORIZED, ask.refusal)

    async def _sees_all(self, msg: Message, caller: Caller) -> bool:
        """Whether the caller sees every backend whole (`policy.ask_to_see_all`)."""
        ask = policy.ask_to_see_all(caller.uid, (o.b.owner_uid for o in self.objects.values()))
        return ask is None or await self.authority.allowed(msg, caller.uid, ask.action, ask.details)

    async def authorize_spawn(
        self,
        msg: Message,
        caller: Caller,
        d: Descriptor,
        p: SpawnPlan,
        idmap: userns_policy.IdMap | None,
        device_gids: tuple[int, ...],
    ) -> RunAs:
        """polkit for the system service; returns the identity the backend will run as."""
        if self.system and (why := untrusted_reason(d.binary)) is not None:
            raise dbus_error(policy.untrusted_refusal(d.name, why))
        # Only polkit reads the app id, and looking it up costs a thread (see caller_app_id).
        app = (
            await caller_app_id(caller.pid) if self.authority.consults_polkit(caller.uid) else None
        )
        mode = idmap.mode if idmap is not None else None  # the mode in effect, asked for or not
        for ask in policy.ask_to_spawn(d, p, idmap_mode=mode, app_id=app):
            await self.authority.check(msg, caller.uid, ask.action, ask.details)
        return run_as(caller.uid, device_gids, system=self.system)

    def _userns_map(self, d: Any, p: SpawnPlan, caller: Caller) -> userns_policy.IdMap | None:
        """Whether this backend runs in a user namespace, and its id map (`userns`)."""
        return userns.plan_for(
            system=self.system,
            dtype=d.type,
            name=d.name,
            requested=p.values.get("idmap"),
            uid=caller.uid,
            sysconfdir=userns.sysconfdir_of(self.broker.index.dirs),
        )

    # ---- methods

    async def spawn(self, name: str, options: dict[str, Variant], fd: int) -> str:
        msg = current_message.get()
        with self.callers.calling(msg.sender), replying_errors():
            return await self._spawn(msg, name, options, fd)

    async def _plan(
        self, name: str, options: dict[str, Variant], listening: bool
    ) -> tuple[Descriptor, SpawnPlan, extras.Extras, tuple[int, ...]]:
        """The descriptor, the plan of its command line (`options`), what the admin vetted
        (`extras`) and the group of each device passed on: InvalidOption, InvalidSocket or
        NotFound for a request that cannot be planned."""
        d = self.broker.index.get(name)
        if d is None:
            raise error(Err.NOT_FOUND, f"{name}: no such descriptor in the effective index")
        raw = {k: (v.signature, v.value) for k, v in options.items()}
        caps = None
        if any(k not in ("detach", "settle-ms") for k in raw) or d.type == "fs":
            result = await self.broker.caps_for(d)
            caps = result if isinstance(result, Capabilities) else None
        try:
            config, conf_path = settings.load_options(userns.sysconfdir_of(self.broker.index.dirs))
            vetted = extras.extras_for(d.type, d.name, config, conf_path)
        except extras.ExtrasError as e:
            raise error(e.name, f"{d.name}: {e}") from None
        p = plan(d, caps, raw, vetted)
        # Checked, then resolved: polkit and the backend see the device itself.
        devices = {k: check_device(k, v) for k, v in p.device_paths.items()}
        if devices:
            resolved = {k: ("s", real) for k, (real, _gid) in devices.items()}
            p = plan(d, caps, {**raw, **resolved}, vetted)
        if (why := policy.socket_kind_error(d, p.socket_kind, listening)) is not None:
            raise error(Err.INVALID_SOCKET, why)
        return d, p, vetted, tuple(gid for _real, gid in devices.values())

    async def _spawn(self, msg: Message, name: str, options: dict[str, Variant], fd: int) -> str:
        try:
            facts = socket_facts(fd)
            if (why := policy.socket_error(facts)) is not None:
                raise error(Err.INVALID_SOCKET, why)
            d, p, vetted, device_gids = await self._plan(name, options, facts.listening)
            caller = await self.caller(msg.sender)
            idmap = self._userns_map(d, p, caller)
            identity = await self.authorize_spawn(msg, caller, d, p, idmap, device_gids)
            running = [(b.owner_uid, not b.life.alive) for b in self.supervisor.backends.values()]
            if (why := policy.quota_error(self.quota, caller.uid, running)) is not None:
                raise error(Err.QUOTA_EXCEEDED, why)
            # The caller may have left while we waited (for polkit, say): then nothing starts
            # (the CVE-2021-3560 class of bug). From here to tracking there is no await, so a
            # departure not seen yet is handled after, by stopping the backend.
            if self.callers.left(caller.name):
                log.info(
                    "Spawn of %s for %s: the caller left the bus; nothing was started",
                    d.name,
                    caller.name,
                )
                raise error(
                    Err.SPAWN_FAILED, f"the caller {caller.name} left the bus; nothing was started"
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
            except (cgroup.LimitsError, userns_policy.UsernsError) as e:
                raise error(e.name, f"{d.name}: {e}") from None
            except SpawnError as e:
                raise error(Err.SPAWN_FAILED, f"{d.name}: {e}") from None
            self._track(b)
            respawn = None
            if vetted.respawn is not None and facts.listening:  # off for connected sockets
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
            raise error(Err.SPAWN_FAILED, f"{d.name}: {e}") from None
        return obj.path

    async def stop_call(self, obj: BackendObject) -> None:
        await self.may_manage(obj.b, "stop it")
        await self.supervisor.stop(obj.b)

    async def list_backends(self) -> list[dict[str, Variant]]:
        """The caller's own backends; everyone's for root and for holders of manage."""
        msg = current_message.get()
        caller = await self.caller(msg.sender)
        with replying_errors():
            whole = await self._sees_all(msg, caller)
        objs = self.objects.values()
        return [o.as_dict() for o in objs if whole or o.b.owner_uid == caller.uid]

    async def view_for(self, msg: Message) -> Callable[[Any], bool]:
        """Which backend objects the caller of ``msg`` may see whole: its own; all of them for
        root and for a caller polkit allows org.vhostuserd.manage (asked once per call, only
        when there is another user's backend to see). The rest are seen without
        `core.fields.PRIVATE_BACKEND_PROPERTIES`."""
        caller = await self.caller(msg.sender)
        try:
            whole = await self._sees_all(msg, caller)
        except BrokerError:  # LimitsExceeded: too many checks pending; see your own only
            whole = False
        uid = caller.uid
        return lambda obj: whole or obj.b.owner_uid == uid

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
        recent = policy.recent_restarts(r.times, now, r.window_s)
        r.times = deque(recent)
        how = f"status {b.exit_status}" if b.exit_signal < 0 else f"signal {b.exit_signal}"
        if len(recent) >= r.limit:
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
        except (userns_policy.UsernsError, SpawnError) as e:
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
                and not await self.callers.name_has_owner(b.owner)
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
