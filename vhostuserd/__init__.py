"""vhostuserd: a D-Bus broker for QEMU vhost-user backends."""

__version__ = "0.1.0"
