"""Descriptor objects under the ObjectManager (docs/contract.md section 3; STYLE: udisks2's model).

Clients that follow the ObjectManager spec (GDBus, sd-bus) listen on the manager's path
only: InterfacesAdded/Removed must come from /org/vhostuserd/Broker1, not from the
object's own path as dbus-fast would send them. State changes of a descriptor object
arrive as PropertiesChanged on that object.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from busutil import (
    BUS_NAME,
    MANAGER_PATH,
    Daemon,
    PrivateBus,
    Tree,
    await_for,
    descriptor,
    fake_backend,
    run,
)
from helpers_live import (
    DESCRIPTOR_IFACE,
    OM_IFACE,
    PROPS_IFACE,
    Listener,
    listen,
    overwrite,
    unwrap,
)

from vhostuserd.bus.manager import descriptor_path

StartDaemon = Callable[..., Daemon]

MANAGER_ONLY = f"type='signal',sender='{BUS_NAME}',path='{MANAGER_PATH}'"
DESCRIPTORS = f"type='signal',sender='{BUS_NAME}',path_namespace='{MANAGER_PATH}/descriptor'"
PROPERTY_NAMES = {
    "Name",
    "Path",
    "Tier",
    "Type",
    "Description",
    "Binary",
    "Tags",
    "Probed",
    "Features",
    "ProbeError",
}


def descriptor_props(d: dict[str, Any]) -> dict[str, Any]:
    """The Descriptor properties that correspond to a ListDescriptors dict."""
    return {
        "Name": d["name"],
        "Path": d["path"],
        "Tier": d["tier"],
        "Type": d["type"],
        "Description": d["description"],
        "Binary": d["binary"],
        "Tags": d["tags"],
        "Probed": "features" in d or "probe_error" in d,
        "Features": d.get("features", []),
        "ProbeError": d.get("probe_error", ""),
    }


async def managed_objects(L: Listener) -> dict[str, dict[str, dict[str, Any]]]:
    (objects,) = await L.call("GetManagedObjects", path=MANAGER_PATH, interface=OM_IFACE)
    return unwrap(objects)  # type: ignore[no-any-return]


def props_changed(L: Listener, mark: int, path: str) -> list[dict[str, Any]]:
    out = []
    for s in L.since(mark, "PropertiesChanged", path, PROPS_IFACE):
        iface, changed, invalidated = s.body
        assert iface == DESCRIPTOR_IFACE and invalidated == [], s.body
        out.append(unwrap(changed))
    return out


async def wait_probed(L: Listener, n: int) -> list[dict[str, Any]]:
    last: list[dict[str, Any]] = []

    async def done() -> bool:
        nonlocal last
        last = await L.descriptors()
        return len(last) == n and all("features" in d or "probe_error" in d for d in last)

    await await_for(done, lambda: f"{n} probed descriptors; have {last}")
    return last


def test_manager_path_listener_sees_descriptors_added_and_removed(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    gpu = fake_backend(tree.root / "gpu", "gpu", ["virgl"])
    tree.write("data", "50-a.json", descriptor("gpu", gpu))
    d = start_daemon()
    backend = fake_backend(tree.root / "input", "input", ["evdev-path"])

    async def main() -> None:
        async with (
            await listen(bus.address, [MANAGER_ONLY]) as om,
            await listen(bus.address, [DESCRIPTORS]) as own_path,
        ):
            path = tree.write(
                "sysconf",
                "40-b.json",
                {"description": "keyboard", "type": "input", "binary": backend, "tags": ["x", "y"]},
            )
            obj = descriptor_path("40-b.json")
            added = await om.wait_signal(lambda s: s.member == "InterfacesAdded", "InterfacesAdded")
            assert (added.path, added.interface, added.signature) == (
                MANAGER_PATH,
                OM_IFACE,
                "oa{sa{sv}}",
            )
            assert added.body[0] == obj
            props = unwrap(added.body[1])[DESCRIPTOR_IFACE]
            assert props == {
                "Name": "40-b.json",
                "Path": str(path),
                "Tier": "sysconf",
                "Type": "input",
                "Description": "keyboard",
                "Binary": backend,
                "Tags": ["x", "y"],
                "Probed": False,
                "Features": [],
                "ProbeError": "",
            }
            mark = om.mark()
            path.unlink()
            removed = await om.wait_signal(
                lambda s: s.member == "InterfacesRemoved", "InterfacesRemoved", mark
            )
            assert (removed.path, removed.interface, removed.signature) == (
                MANAGER_PATH,
                OM_IFACE,
                "oas",
            )
            assert removed.body == [obj, [DESCRIPTOR_IFACE]]
            await om.settle(tree.dir("sysconf"))
            await own_path.generation()  # every signal sent before this reply has arrived
            # Exactly one of each on the manager path, none from the objects' own paths.
            assert [s.member for s in om.signals if s.interface == OM_IFACE] == [
                "InterfacesAdded",
                "InterfacesRemoved",
            ]
            assert not [s for s in own_path.signals if s.interface == OM_IFACE]

    run(main())
    d.assert_clean_log()


def test_get_managed_objects_lists_every_descriptor_with_its_properties(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    gpu = fake_backend(tree.root / "gpu", "gpu", ["virgl", "render-node"])
    fs = fake_backend(tree.root / "fs", "fs", [])
    tree.write("data", "50-gpu.json", {**descriptor("gpu", gpu, "a gpu"), "tags": ["fast"]})
    tree.write("data", "60-fs.json", descriptor("fs", fs, "shared dirs"), index=1)
    tree.write("sysconf", "70-broken.json", descriptor("net", "/nonexistent/backend", "no binary"))
    tree.write("user", "80-bad.json", "{not json")
    tree.write("user", "90-masked.json", "")
    tree.write("data", "90-masked.json", descriptor("gpu"))
    d = start_daemon()

    async def main() -> None:
        async with await listen(bus.address) as L:
            items = await wait_probed(L, 3)
            assert [i["name"] for i in items] == ["50-gpu.json", "60-fs.json", "70-broken.json"]
            objects = await managed_objects(L)
            assert set(objects) == {i["object"] for i in items}
            for i in items:
                ifaces = objects[i["object"]]
                assert list(ifaces) == [DESCRIPTOR_IFACE]
                props = ifaces[DESCRIPTOR_IFACE]
                assert set(props) == PROPERTY_NAMES
                assert props == descriptor_props(i)
                # GetAll on the object agrees with the ObjectManager's view.
                (all_props,) = await L.call(
                    "GetAll", "s", [DESCRIPTOR_IFACE], path=i["object"], interface=PROPS_IFACE
                )
                assert unwrap(all_props) == props
            by_name = {
                p["Name"]: p for p in (objects[i["object"]][DESCRIPTOR_IFACE] for i in items)
            }
            assert by_name["50-gpu.json"]["Features"] == ["virgl", "render-node"]
            assert by_name["50-gpu.json"]["Tags"] == ["fast"]
            fs_props = by_name["60-fs.json"]
            assert (fs_props["Tier"], fs_props["Features"]) == ("data", [])
            broken = by_name["70-broken.json"]
            assert broken["Probed"] is True and broken["Features"] == []
            assert "/nonexistent/backend" in broken["ProbeError"]
            # A change shows up in the next GetManagedObjects.
            tree.write("sysconf", "50-gpu.json", "")
            await L.wait_names(["60-fs.json", "70-broken.json"])
            assert set(await managed_objects(L)) == {
                descriptor_path("60-fs.json"),
                descriptor_path("70-broken.json"),
            }

    run(main())
    d.assert_clean_log()


def test_properties_changed_when_a_file_changes_in_place(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    first = fake_backend(tree.root / "gpu1", "gpu", ["virgl"])
    second = fake_backend(tree.root / "gpu2", "gpu", ["render-node", "virgl"])
    path = tree.write("sysconf", "50-gpu.json", descriptor("gpu", first, "before"))
    obj = descriptor_path("50-gpu.json")
    d = start_daemon()

    async def main() -> None:
        async with await listen(bus.address, [DESCRIPTORS]) as L:
            await wait_probed(L, 1)
            m = L.mark()
            overwrite(path, json.dumps({**descriptor("gpu", first, "after"), "tags": ["t"]}))
            await await_for(lambda: props_changed(L, m, obj), "PropertiesChanged for the edit")
            await L.settle(tree.dir("sysconf"))
            # One signal with exactly the properties that changed.
            assert props_changed(L, m, obj) == [{"Description": "after", "Tags": ["t"]}]
            m = L.mark()
            overwrite(path, json.dumps({**descriptor("gpu", second, "after"), "tags": ["t"]}))
            # A new binary: not probed yet, then probed with its own features.
            await await_for(
                lambda: len(props_changed(L, m, obj)) == 2,
                lambda: f"two PropertiesChanged; have {props_changed(L, m, obj)}",
            )
            await L.settle(tree.dir("sysconf"))
            assert props_changed(L, m, obj) == [
                {"Binary": second, "Probed": False, "Features": []},
                {"Probed": True, "Features": ["render-node", "virgl"]},
            ]
            props = (await managed_objects(L))[obj][DESCRIPTOR_IFACE]
            assert (props["Binary"], props["Features"], props["Probed"]) == (
                second,
                ["render-node", "virgl"],
                True,
            )

    run(main())
    d.assert_clean_log()


def test_properties_changed_when_a_probe_completes(
    bus: PrivateBus, tree: Tree, start_daemon: StartDaemon
) -> None:
    d = start_daemon()
    good = fake_backend(tree.root / "blk", "block", ["read-only"])
    bad = fake_backend(tree.root / "bad", "block", [], body="")
    # A backend that prints the wrong type fails its probe.
    bad_script = (tree.root / "bad").read_text().replace('"type": "block"', '"type": "gpu"')
    (tree.root / "bad").write_text(bad_script)

    async def main() -> None:
        async with await listen(bus.address, [MANAGER_ONLY, DESCRIPTORS]) as L:
            for name, binary, want in [
                ("50-blk.json", good, {"Probed": True, "Features": ["read-only"]}),
                ("60-bad.json", bad, None),
            ]:
                m = L.mark()
                obj = descriptor_path(name)
                tree.write("data", name, descriptor("block", binary))
                added = await L.wait_signal(
                    lambda s, o=obj: s.member == "InterfacesAdded" and s.body[0] == o,
                    f"InterfacesAdded for {name}",
                    m,
                )
                assert unwrap(added.body[1])[DESCRIPTOR_IFACE]["Probed"] is False
                await await_for(lambda o=obj, m=m: props_changed(L, m, o), f"the probe of {name}")
                (changed,) = props_changed(L, m, obj)
                if want is not None:
                    assert changed == want
                else:
                    assert set(changed) == {"Probed", "ProbeError"} and changed["Probed"] is True
                    assert "type-mismatch" in changed["ProbeError"], changed
                # The signal came after the object was announced.
                assert L.signals.index(added) < L.signals.index(
                    L.since(m, "PropertiesChanged", obj)[0]
                )
                assert await L.prop("Probed", obj, DESCRIPTOR_IFACE) is True

    run(main())
    log = d.log()
    d.assert_clean_log()
    assert "type-mismatch" in log  # the failed probe is logged as a warning, not a traceback
