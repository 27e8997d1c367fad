"""The field lists (vhostuserd/core/fields.py), without a bus: every form the daemon sends an
object in (its D-Bus properties, the ListDescriptors/ListBackends dict) reads back, in the
client, as the one JSON object of docs/json.md, which offline output makes from the model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from vhostuserd.core.descriptors import Capabilities, Descriptor, ProbeError, ProbeResult
from vhostuserd.core.fields import (
    BACKEND_FIELDS,
    DESCRIPTOR_FIELDS,
    PRIVATE_BACKEND_PROPERTIES,
    BackendView,
    DescriptorInfo,
    json_from_bus,
    json_object,
    listing,
    properties,
)
from vhostuserd.core.lifecycle import Event, Lifecycle
from vhostuserd.edges.cgroup import Usage

D = Descriptor("50-gpu.json", "/usr/share/qemu/vhost-user/50-gpu.json", "data", "gpu", "a gpu",
               "/usr/libexec/gpu", ("local",))  # fmt: skip
PATH = "/org/vhostuserd/Broker1/descriptor/_350_2dgpu_2ejson"
PROBES: dict[str, ProbeResult | None] = {
    "not probed": None,
    "features": Capabilities("gpu", ("virgl", "render-node"), "{}"),
    "no features": Capabilities("gpu", (), "{}"),
    "probe failed": ProbeError("timeout", "no answer in 5 s"),
}


def values(encoded: dict[str, tuple[str, Any]]) -> dict[str, Any]:
    return {k: v for k, (_sig, v) in encoded.items()}


@pytest.mark.parametrize("probe", PROBES)
def test_a_descriptor_reads_back_as_the_same_json_from_each_form(probe: str) -> None:
    info = DescriptorInfo.of(D, PROBES[probe], PATH)
    expected = info.as_dict()
    assert DescriptorInfo.from_dict(values(listing(DESCRIPTOR_FIELDS, info))).as_dict() == expected
    props = values(properties(DESCRIPTOR_FIELDS, info))
    assert DescriptorInfo.from_properties(props, PATH).as_dict() == expected
    offline = DescriptorInfo.of(D, PROBES[probe], None).as_dict()
    assert offline == {**expected, "object": None}
    assert expected["probed"] == (probe != "not probed")


def test_the_descriptor_dict_leaves_out_what_it_does_not_know_and_properties_cannot() -> None:
    info = DescriptorInfo.of(D, None, PATH)
    assert set(values(listing(DESCRIPTOR_FIELDS, info))) == {
        "name", "path", "tier", "type", "description", "binary", "tags", "object"
    }  # fmt: skip
    props = values(properties(DESCRIPTOR_FIELDS, info))
    assert (props["Probed"], props["Features"], props["ProbeError"]) == (False, [], "")


@dataclass
class Process:
    descriptor: str = "50-gpu.json"
    binary: str = "/usr/libexec/gpu"
    argv: tuple[str, ...] = ("/usr/libexec/gpu", "--fd=3")
    pid: int = 4711
    owner_uid: int = 1000
    owner: str = ":1.42"
    exit_status: int = -1
    exit_signal: int = -1
    started_at: int = 1764633600000000
    detached: bool = False
    life: Lifecycle = field(default_factory=lambda: Lifecycle("65"))


def a_backend(*events: Event, **process: Any) -> Process:
    life = Lifecycle("65")
    for event in events:
        life.advance(event)
    return Process(life=life, **process)


@pytest.mark.parametrize(
    ("view", "expected"),
    [
        (
            BackendView(a_backend(Event.SPAWNED), "", Usage()),
            {"state": "running", "exit_status": None, "cgroup": None, "cpu_usec": None},
        ),
        (
            BackendView(
                a_backend(Event.SPAWNED, Event.EXITED, exit_status=0),
                "/backend-65",
                Usage(1520000, 0, 52428800, 0),
            ),
            {"state": "exited", "exit_status": 0, "cgroup": "/backend-65", "cpu_usec": 1520000},
        ),
    ],
)
def test_a_backend_reads_back_as_the_same_json_from_each_form(
    view: BackendView, expected: dict[str, Any]
) -> None:
    from_dict = json_from_bus(BACKEND_FIELDS, values(listing(BACKEND_FIELDS, view)))
    from_props = json_from_bus(BACKEND_FIELDS, values(properties(BACKEND_FIELDS, view)))
    assert from_props == {**from_dict, "object": None}  # the path is not a property
    assert from_dict == json_object(BACKEND_FIELDS, view)
    assert from_dict["object"] == "/org/vhostuserd/Broker1/backend/65"
    assert {k: from_dict[k] for k in expected} == expected
    assert "restarts" not in from_dict  # a property only (docs/json.md has no such key)


def test_a_backend_property_says_minus_one_where_json_says_null() -> None:
    props = values(properties(BACKEND_FIELDS, BackendView(a_backend(Event.SPAWNED), "", Usage())))
    said = {k: props[k] for k in ("ExitStatus", "Cgroup", "Tasks", "Restarts")}
    assert said == {"ExitStatus": -1, "Cgroup": "", "Tasks": -1, "Restarts": 0}
    assert {"Argv", "Pid", "Owner", "OwnerUid"} == PRIVATE_BACKEND_PROPERTIES


def test_every_key_and_property_is_named_once() -> None:
    for fields in (DESCRIPTOR_FIELDS, BACKEND_FIELDS):
        keys = [f.key for f in fields]
        props = [f.prop for f in fields if f.prop]
        assert len(set(keys)) == len(keys) and len(set(props)) == len(props)
