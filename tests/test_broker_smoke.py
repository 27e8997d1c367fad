"""The daemon on a real private bus answers the Manager API (docs/contract.md section 3)."""

from __future__ import annotations

from busutil import BUS_NAME, MANAGER_PATH, Daemon, PrivateBus, Tree, descriptor, fake_backend


def test_busctl_introspect_and_resolve(bus: PrivateBus, tree: Tree, start_daemon) -> None:  # type: ignore[no-untyped-def]
    gpu = fake_backend(tree.root / "gpu", "gpu", ["virgl", "render-node"])
    tree.write("data", "50-gpu.json", descriptor("gpu", gpu))
    d: Daemon = start_daemon()
    out = bus.busctl("introspect", BUS_NAME, MANAGER_PATH).stdout
    assert "org.vhostuserd.Broker1.Manager" in out and ".Resolve" in out
    r = bus.busctl(
        "call",
        BUS_NAME,
        MANAGER_PATH,
        "org.vhostuserd.Broker1.Manager",
        "Resolve",
        "sas",
        "gpu",
        "1",
        "virgl",
    )
    assert '"name" s "50-gpu.json"' in r.stdout
    assert d.proc.poll() is None
