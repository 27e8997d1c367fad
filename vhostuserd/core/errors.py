"""The broker's error vocabulary (docs/contract.md section 6), defined once.

Each name is a D-Bus error ``org.vhostuserd.Broker1.Error.<Name>``; its comment gives the shape
of its messages, which always name the file, option, descriptor or reason. The core and the
edges raise `BrokerError` with one of these names; the bus turns it into the D-Bus error
(`vhostuserd.bus.connection.dbus_error`), and the client maps the name back to its exception
class (`vhostuserd.client`), so daemon and client cannot disagree on a name.
"""

from __future__ import annotations

from enum import StrEnum

from vhostuserd.core.names import ERROR_PREFIX

# polkit would ask the user, but the call did not allow interaction (docs/contract.md, 3).
INTERACTIVE_REQUIRED = "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"


class Err(StrEnum):
    """The error names, with the shape of each one's messages."""

    NOT_FOUND = "NotFound"
    """"NAME: no such descriptor in the effective index", "no backend ID", or for Resolve each
    candidate with why it was rejected."""
    INVALID_OPTION = "InvalidOption"
    """"option 'NAME': why" (unknown, wrong type, not absolute, not under /dev/..., ...)."""
    INVALID_SOCKET = "InvalidSocket"
    """"the socket argument is ...": not an AF_UNIX SOCK_STREAM socket, or the wrong kind
    (connected or listening) for the backend type."""
    SPAWN_FAILED = "SpawnFailed"
    """"NAME: why": the exec failed, the backend exited within the settle time (with its last
    output), or an admin's settings file is broken (file, section, key)."""
    PROBE_FAILED = "ProbeFailed"
    """"NAME: BINARY --print-capabilities failed: why"."""
    QUOTA_EXCEEDED = "QuotaExceeded"
    """"uid N runs M backends, the most --max-backends-per-user allows" (or the daemon's total)."""
    NOT_AUTHORIZED = "NotAuthorized"
    """"ACTION: not authorized for uid N", or why the caller or the binary is not trusted."""
    LIMITS_EXCEEDED = "LimitsExceeded"
    """"CALL: how much was sent, and the bound" (never what was sent)."""

    @property
    def dbus_name(self) -> str:
        return ERROR_PREFIX + self.value

    @classmethod
    def of(cls, dbus_name: str) -> Err | None:
        """The name for a D-Bus error name, or None when it is none of ours."""
        if not dbus_name.startswith(ERROR_PREFIX):
            return None
        try:
            return cls(dbus_name[len(ERROR_PREFIX) :])
        except ValueError:
            return None


class BrokerError(Exception):
    """A request the broker refuses or cannot carry out: ``name`` says which, ``str(e)`` why."""

    def __init__(self, name: Err, message: str) -> None:
        super().__init__(message)
        self.name = name

    @property
    def kind(self) -> str:
        """The short name (``NotFound``, ...), as in the D-Bus error name."""
        return self.name.value

    @property
    def dbus_name(self) -> str:
        """The D-Bus error name a caller receives."""
        return self.name.dbus_name


class InteractionRequired(BrokerError):
    """A NotAuthorized that polkit would have turned into a password prompt, had the call
    allowed interaction: sent as freedesktop's INTERACTIVE_REQUIRED, which tells a caller to
    retry with interaction allowed (the client's InteractiveAuthorizationRequired is a
    NotAuthorized)."""

    def __init__(self, message: str) -> None:
        super().__init__(Err.NOT_AUTHORIZED, message)

    @property
    def dbus_name(self) -> str:
        return INTERACTIVE_REQUIRED
