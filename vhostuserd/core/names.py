"""The names of the D-Bus API, defined once (docs/contract.md section 3): the daemon's objects
(`service`, `backends`) and the client (`client`, `cli`) take them from here. Pure constants."""

BUS_NAME = "org.vhostuserd.Broker1"
MANAGER_PATH = "/org/vhostuserd/Broker1"
DESCRIPTOR_PREFIX = MANAGER_PATH + "/descriptor/"
BACKEND_PREFIX = MANAGER_PATH + "/backend/"
MANAGER_IFACE = "org.vhostuserd.Broker1.Manager"
DESCRIPTOR_IFACE = "org.vhostuserd.Broker1.Descriptor"
BACKEND_IFACE = "org.vhostuserd.Broker1.Backend"
ERROR_PREFIX = "org.vhostuserd.Broker1.Error."

OBJECT_MANAGER_IFACE = "org.freedesktop.DBus.ObjectManager"
PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"
INTROSPECTABLE_IFACE = "org.freedesktop.DBus.Introspectable"
PEER_IFACE = "org.freedesktop.DBus.Peer"
