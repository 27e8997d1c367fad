"""The fields of the exported objects, once each: the Descriptor and Backend objects of
docs/contract.md section 3 and the JSON objects of docs/json.md.

A field is one line: its key (the JSON key, and the key of the ListDescriptors, Resolve and
ListBackends dicts), its D-Bus property, its D-Bus type and where to read it in the model, as
the JSON value: None where it is unknown or does not apply. From these lists come the D-Bus
properties of the objects (`vhostuserd.bus.properties`), their values (GetManagedObjects,
InterfacesAdded, PropertiesChanged, GetAll), the dicts, and the JSON objects online
(`vhostuserd.client`, from what the daemon said) and offline (`vhostuserd.local`).

Where a field has no value: a D-Bus property cannot be absent, so it says the field's ``null``
(``-1``, ``""``), or the zero of its type when it has none; a dict says ``null`` too, and leaves
the key out when there is none; JSON says null. Read back from the bus, ``null`` means None.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Generic, Self, TypeVar

from vhostuserd.core.descriptors import Capabilities, Descriptor, ProbeError, ProbeResult
from vhostuserd.core.names import BACKEND_PREFIX

M = TypeVar("M")

_ZERO: dict[str, Any] = {"s": "", "o": "/", "b": False}


def _plain(value: Any) -> Any:
    """As the bus and JSON take it: a list for a sequence."""
    return list(value) if isinstance(value, tuple) else value


class Field(Generic[M]):
    """One field of an exported object (see the module's docstring)."""

    __slots__ = ("key", "prop", "signature", "read", "null", "listed", "shown", "private")

    def __init__(
        self,
        key: str,
        prop: str | None,
        signature: str,
        read: str | Callable[[M], Any] | None = None,
        *,
        null: Any = None,
        listed: bool = True,
        shown: bool = True,
        private: bool = False,
    ) -> None:
        self.key = key
        self.prop = prop  # None: in the dicts and JSON only
        self.signature = signature
        # An attribute path of the model (default: the key), or a function of it.
        self.read: Callable[[M], Any] = (
            attrgetter(read or key) if read is None or isinstance(read, str) else read
        )
        self.null = null
        self.listed = listed  # a key of the ListDescriptors/ListBackends dict
        self.shown = shown  # a key of the JSON object
        self.private = private  # hidden from other users (docs/contract.md section 7)

    def value(self, model: M) -> Any:
        """What the D-Bus property says."""
        value = self.read(model)
        if value is not None:
            return _plain(value)
        if self.null is not None:
            return self.null
        return [] if self.signature.startswith("a") else _ZERO.get(self.signature, 0)

    def from_bus(self, value: Any) -> Any:
        """The JSON value of what the daemon said: None when it did not say, or said ``null``."""
        if value is None or (self.null is not None and value == self.null):
            return None
        return _plain(value)

    def __repr__(self) -> str:
        return f"Field({self.key!r}, {self.prop!r}, {self.signature!r})"


def properties(fields: Sequence[Field[M]], model: M) -> dict[str, tuple[str, Any]]:
    """The D-Bus properties now: {name: (signature, value)}."""
    return {f.prop: (f.signature, f.value(model)) for f in fields if f.prop is not None}


def listing(fields: Sequence[Field[M]], model: M) -> dict[str, tuple[str, Any]]:
    """The ListDescriptors/ListBackends dict: {key: (signature, value)}."""
    out = {}
    for f in fields:
        if f.listed:
            value = f.read(model)
            if value is None and f.null is None:
                continue  # absent, as docs/contract.md says (features until probed, ...)
            out[f.key] = (f.signature, f.null if value is None else _plain(value))
    return out


def json_object(fields: Sequence[Field[M]], model: M) -> dict[str, Any]:
    """The JSON object of docs/json.md: every key, None where there is no value."""
    return {f.key: _plain(f.read(model)) for f in fields if f.shown}


def json_from_bus(fields: Sequence[Field[Any]], said: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON object from what the daemon said, by key (a dict) or by property name (all the
    properties, or the few a PropertiesChanged carries); None for what it did not say."""
    return {
        f.key: f.from_bus(said[f.key] if f.key in said else said.get(f.prop or ""))
        for f in fields
        if f.shown
    }


# ---- Descriptor


@dataclass(frozen=True, slots=True)
class DescriptorInfo:
    """One effective descriptor as reported, the model of DESCRIPTOR_FIELDS: made by the daemon
    from its index and probe results, offline the same way with no object (`of`), and by the
    client from what the daemon said (`from_dict`, `from_properties`)."""

    name: str = ""
    path: str = ""
    tier: str = ""
    type: str = ""
    description: str = ""
    binary: str = ""
    tags: tuple[str, ...] = ()
    features: tuple[str, ...] | None = None  # None until probed, and when the probe failed
    probe_error: str | None = None  # "CODE: detail" when the probe failed
    object: str | None = None  # its D-Bus object path; None offline

    @property
    def probed(self) -> bool:
        return self.features is not None or self.probe_error is not None

    @classmethod
    def of(cls, d: Descriptor, caps: ProbeResult | None, object: str | None) -> Self:
        """The daemon's (and offline, with no object): what the descriptor file says, by the
        names both have, and what its probe found."""
        return cls(
            **{name: getattr(d, name) for name in _FROM_DESCRIPTOR},
            features=caps.features if isinstance(caps, Capabilities) else None,
            probe_error=str(caps) if isinstance(caps, ProbeError) else None,
            object=object,
        )

    @classmethod
    def from_dict(cls, said: Mapping[str, Any]) -> Self:
        """From a ListDescriptors or Resolve dict (D-Bus variants unwrapped)."""
        return cls(**_said(said, {f.key: f for f in DESCRIPTOR_FIELDS if f.listed}))

    @classmethod
    def from_properties(cls, said: Mapping[str, Any], object: str | None) -> Self:
        """From the object's properties (InterfacesAdded). A property cannot be absent: Probed
        says whether Features and ProbeError mean anything, and ProbeError is "" for none."""
        values = _said(said, {f.prop: f for f in DESCRIPTOR_FIELDS if f.listed and f.prop})
        probed, error = bool(said.get("Probed")), values.get("probe_error") or None
        values["probe_error"] = error if probed else None
        values["features"] = values.get("features") if probed and error is None else None
        return cls(**values, object=object)

    def as_dict(self) -> dict[str, Any]:
        """The Descriptor object of docs/json.md."""
        return json_object(DESCRIPTOR_FIELDS, self)


_FROM_DESCRIPTOR = tuple(
    f.name for f in dataclasses.fields(DescriptorInfo) if hasattr(Descriptor, f.name)
)


def _said(said: Mapping[str, Any], by_name: Mapping[str, Field[Any]]) -> dict[str, Any]:
    """The model's values among what the daemon said (by key or by property name)."""
    values = {}
    for name, f in by_name.items():
        if name in said:
            value = f.from_bus(said[name])
            values[f.key] = tuple(value) if isinstance(value, list) else value
    return values


DESCRIPTOR_FIELDS: tuple[Field[DescriptorInfo], ...] = (
    Field("name", "Name", "s"),
    Field("path", "Path", "s"),
    Field("tier", "Tier", "s"),
    Field("type", "Type", "s"),
    Field("description", "Description", "s"),
    Field("binary", "Binary", "s"),
    Field("tags", "Tags", "as"),
    Field("probed", "Probed", "b", listed=False),
    Field("features", "Features", "as"),
    Field("probe_error", "ProbeError", "s"),
    Field("object", None, "o"),
)


# ---- Backend


@dataclass(frozen=True, slots=True)
class BackendView:
    """A backend as its object shows it now, the model of BACKEND_FIELDS: its current process
    (`vhostuserd.edges.backend.Backend`, whose ``life`` is its `core.lifecycle.Lifecycle`),
    its cgroup as /proc/PID/cgroup names it ("" without one) and what it consumed
    (`vhostuserd.edges.cgroup.Usage`, -1 where not measured; the bus reads it when first asked)."""

    process: Any
    cgroup: str
    usage: Any


def _measured(path: str) -> Callable[[BackendView], int | None]:
    """A number that is -1 where it does not apply (exit status) or is not measured (cgroup)."""
    get = attrgetter(path)

    def read(v: BackendView) -> int | None:
        n: int = get(v)
        return n if n >= 0 else None

    return read


BACKEND_FIELDS: tuple[Field[BackendView], ...] = (
    Field("id", "Id", "s", "process.life.id"),
    Field("descriptor", "Descriptor", "s", "process.descriptor"),
    Field("binary", "Binary", "s", "process.binary"),
    Field("argv", "Argv", "as", "process.argv", private=True),
    Field("pid", "Pid", "u", "process.pid", private=True),
    Field("owner_uid", "OwnerUid", "u", "process.owner_uid", private=True),
    Field("owner", "Owner", "s", "process.owner", private=True),
    Field("state", "State", "s", "process.life.shown"),
    Field("exit_status", "ExitStatus", "i", _measured("process.exit_status"), null=-1),
    Field("exit_signal", "ExitSignal", "i", _measured("process.exit_signal"), null=-1),
    Field("started_at", "StartedAt", "t", "process.started_at"),
    Field("detached", "Detached", "b", "process.detached"),
    Field("object", None, "o", lambda v: BACKEND_PREFIX + v.process.life.id),
    Field("cgroup", "Cgroup", "s", lambda v: v.cgroup or None, null=""),
    Field("cpu_usec", "CpuUsec", "x", _measured("usage.cpu_usec"), null=-1),
    Field("memory_current", "MemoryCurrent", "x", _measured("usage.memory_current"), null=-1),
    Field("memory_peak", "MemoryPeak", "x", _measured("usage.memory_peak"), null=-1),
    Field("tasks", "Tasks", "x", _measured("usage.tasks"), null=-1),
    Field("restarts", "Restarts", "u", "process.life.restarts", listed=False, shown=False),
)
# What a caller may see of another user's backend on the system service (docs/threat-model.md,
# "Per-caller view"): everything but these, which say what it runs, as whom, and where.
PRIVATE_BACKEND_PROPERTIES = frozenset(f.prop for f in BACKEND_FIELDS if f.private and f.prop)
