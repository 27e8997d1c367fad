"""The D-Bus service: the connection with its dbus-fast fixes, the exported objects, and the
broker that wires the edges to the core. Only `vhostuserd.daemon` imports it:
docs/architecture.md."""
