"""The D-Bus face of the broker: the Manager and Descriptor objects of docs/contract.md section 3,
and the `Broker` that wires them to the live index and the probes.

Owns what is exported at the manager's path and under ``descriptor/``: the objects follow the
index's changes, probes run once per binary and fill in capabilities, Resolve is answered
from the message handler when no probe is needed (`_resolve_now`) and by the method when one
is. The rules are the core's (`resolve`, `policy`); the connection and its fixes are
`bus.connection`'s; Spawn and the backends are `bus.backends`'.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING

from dbus_fast import Message, PropertyAccess, Variant
from dbus_fast.service import ServiceInterface, dbus_property, method, signal

from vhostuserd import __version__
from vhostuserd.bus.connection import (
    Bus,
    current_message,
    error,
    error_reply,
    replying_errors,
)
from vhostuserd.bus.properties import FieldObject
from vhostuserd.core import policy
from vhostuserd.core.descriptors import (
    Descriptor,
    Diagnostic,
    ProbeError,
    ProbeResult,
)
from vhostuserd.core.errors import BrokerError, Err
from vhostuserd.core.fields import DESCRIPTOR_FIELDS, DescriptorInfo
from vhostuserd.core.index import Change
from vhostuserd.core.names import (
    DESCRIPTOR_IFACE,
    DESCRIPTOR_PREFIX,
    MANAGER_IFACE,
    MANAGER_PATH,
)
from vhostuserd.core.resolve import resolve
from vhostuserd.edges.probe import ProbeCache
from vhostuserd.edges.watch import Feed

if TYPE_CHECKING:
    from vhostuserd.bus.backends import Spawner

log = logging.getLogger("vhostuserd.service")


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


class DescriptorObject(FieldObject):
    """One effective descriptor, at /org/vhostuserd/Broker1/descriptor/<escaped name>: its
    properties are `DESCRIPTOR_FIELDS`."""

    fields = DESCRIPTOR_FIELDS

    def __init__(self, descriptor: Descriptor) -> None:
        super().__init__(DESCRIPTOR_IFACE)
        self.descriptor = descriptor
        self.path = descriptor_path(descriptor.name)
        self.caps: ProbeResult | None = None
        self._info: DescriptorInfo | None = None
        self._dict: dict[str, Variant] | None = None

    def model(self) -> DescriptorInfo:
        if self._info is None:
            self._info = DescriptorInfo.of(self.descriptor, self.caps, self.path)
        return self._info

    def as_dict(self) -> dict[str, Variant]:
        # Kept until the next update: Resolve and ListDescriptors send it on every call, and
        # building it (a Variant per field) was a fifth of a fast-path Resolve's cost.
        if self._dict is None:
            self._dict = super().as_dict()
        return self._dict

    def update(self, descriptor: Descriptor | None = None, caps: ProbeResult | None = None) -> None:
        before = self.variants()
        if descriptor is not None:
            self.descriptor = descriptor
        self.caps = caps
        self._info = self._dict = None
        after = self.variants()
        changed = {k: v.value for k, v in after.items() if before[k] != v}
        if changed:
            self.emit_properties_changed(changed)


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
        obj = await self.broker.resolve(type, features)
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
                Err.INVALID_SOCKET,
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
        ask = policy.ask_to_reload()
        with replying_errors():
            await self.broker.spawner.authority.check(msg, caller.uid, ask.action, ask.details)
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

    def __init__(self, bus: Bus, feed: Feed, probes: ProbeCache) -> None:
        self.bus = bus
        self.feed = feed
        self.index = feed.index
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
        self.on_change(self.feed.rescan())

    @property
    def diagnostics(self) -> tuple[Diagnostic, ...]:
        """The index's, plus (system service) descriptors whose binary it will not run."""
        untrusted = self.probes.untrusted
        if untrusted is None:
            return self.index.diagnostics
        return self.index.diagnostics + policy.untrusted_diagnostics(
            self.index.descriptors, untrusted
        )

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
            raise error(Err.NOT_FOUND, f"{name}: no such descriptor in the effective index")
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

    def _candidates(self, btype: str, features: list[str]) -> list[Descriptor]:
        """The descriptors whose capabilities a Resolve needs (none without features); a
        request over the bounds is refused first (`policy.features_error`)."""
        if (why := policy.features_error(features)) is not None:
            raise BrokerError(Err.LIMITS_EXCEEDED, f"Resolve: {why}")
        return [d for d in self.index.descriptors if d.type == btype] if features else []

    def _chosen(
        self, btype: str, features: list[str], probed: dict[str, ProbeResult]
    ) -> DescriptorObject:
        """Rule 5 over the index as it is now (it may have moved on while probes ran), with
        these capabilities; NotFound says why each candidate was rejected."""
        resolution = resolve(self.index.descriptors, btype, features, lambda d: probed.get(d.name))
        if resolution.chosen is None or resolution.chosen.name not in self.objects:
            raise BrokerError(Err.NOT_FOUND, resolution.explain(btype, features))
        return self.objects[resolution.chosen.name]

    def _resolve_now(self, msg: Message) -> Message | None:
        """Resolve without waiting, when every candidate's capabilities are known."""
        btype, features = msg.body
        try:
            probed: dict[str, ProbeResult] = {}
            for d in self._candidates(btype, features):
                result = self.cached_caps(d)
                if result is None:
                    return None  # a probe is needed: the async method waits for it
                probed[d.name] = result
            obj = self._chosen(btype, features, probed)
        except BrokerError as e:
            return error_reply(msg, e.name, str(e))
        return Message.new_method_return(msg, "oa{sv}", [obj.path, obj.as_dict()])

    async def resolve(self, btype: str, features: list[str]) -> DescriptorObject:
        with replying_errors():
            candidates = self._candidates(btype, features)
            results = await asyncio.gather(*(self.caps_for(d) for d in candidates))
            probed = {d.name: r for d, r in zip(candidates, results, strict=True)}
            return self._chosen(btype, features, probed)

    async def capabilities(self, name: str) -> str:
        d = self._named(name)
        result = await self.caps_for(d)
        if isinstance(result, ProbeError):
            raise error(
                Err.PROBE_FAILED, f"{name}: {d.binary} --print-capabilities failed: {result}"
            )
        return result.json
