"""dbus/org.vhostuserd.Broker1.xml is exactly what the running service introspects.

Regenerate the file after an intended API change with:
    python tests/test_introspection.py --write unix:path=BUS_SOCKET   (a daemon running there)
"""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from busutil import BUS_NAME, MANAGER_PATH, PrivateBus, Tree, descriptor, fake_backend

XML_FILE = Path(__file__).resolve().parent.parent / "dbus" / "org.vhostuserd.Broker1.xml"
OUR_PREFIX = "org.vhostuserd.Broker1."
HEADER = """<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"
"http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">
<!-- The D-Bus API of vhostuserd (bus name org.vhostuserd.Broker1); see docs/contract.md section 3.
     Manager and ObjectManager: /org/vhostuserd/Broker1
     Descriptor: /org/vhostuserd/Broker1/descriptor/<escaped file name>
     Backend: /org/vhostuserd/Broker1/backend/<id>
     Generated from the running service by tests/test_introspection.py, which also checks it. -->
"""


def introspect(address: str, path: str) -> str:
    out = subprocess.run(
        [
            "busctl",
            f"--address={address}",
            "--json=short",
            "call",
            BUS_NAME,
            path,
            "org.freedesktop.DBus.Introspectable",
            "Introspect",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    import json

    return str(json.loads(out)["data"][0])


def our_interfaces(xml_text: str) -> dict[str, str]:
    """name -> canonical text of each org.vhostuserd.Broker1.* interface."""
    root = ET.fromstring(
        xml_text.split("\n", 2)[2] if xml_text.startswith("<!DOCTYPE") else xml_text
    )
    out = {}
    for iface in root.iter("interface"):
        name = iface.get("name", "")
        if name.startswith(OUR_PREFIX):
            for el in iface.iter():
                el.text = el.tail = None
            out[name] = ET.tostring(iface, encoding="unicode")
    return out


def live_interfaces(address: str) -> dict[str, str]:
    found: dict[str, str] = {}
    found.update(our_interfaces(introspect(address, MANAGER_PATH)))
    tree = subprocess.run(
        ["busctl", f"--address={address}", "--list", "tree", BUS_NAME],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for prefix in ("/descriptor/", "/backend/"):
        paths = [p for p in tree if p.startswith(MANAGER_PATH + prefix)]
        if paths:
            found.update(our_interfaces(introspect(address, paths[0])))
    return found


def write(address: str) -> None:
    ifaces = live_interfaces(address)
    root = ET.Element("node")
    for name in sorted(ifaces):
        root.append(ET.fromstring(ifaces[name]))
    ET.indent(root, space="  ")
    XML_FILE.write_text(HEADER + ET.tostring(root, encoding="unicode") + "\n")


def test_xml_file_equals_running_service(bus: PrivateBus, tree: Tree, start_daemon) -> None:  # type: ignore[no-untyped-def]
    gpu = fake_backend(tree.root / "gpu", "gpu", ["virgl"])
    tree.write("data", "50-gpu.json", descriptor("gpu", gpu))
    start_daemon()
    live = live_interfaces(bus.address)
    shipped = our_interfaces(XML_FILE.read_text())
    assert "org.vhostuserd.Broker1.Manager" in live and "org.vhostuserd.Broker1.Descriptor" in live
    # Backend objects exist only while backends run; every shipped interface must match
    # what the service exports wherever it is exported.
    for name, text in live.items():
        assert shipped.get(name) == text, (
            f"{name} differs from {XML_FILE.name}; regenerate it (see docstring)"
        )
    missing = set(shipped) - set(live) - {"org.vhostuserd.Broker1.Backend"}
    assert not missing, (
        f"{XML_FILE.name} documents interfaces the service does not export: {missing}"
    )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--write":
        write(sys.argv[2])
    else:
        sys.exit(__doc__)
