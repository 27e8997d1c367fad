"""Which Spawn options exist (docs/contract.md section 3, Spawn options): their D-Bus types,
which backend type and capability each needs, the limits on values, and which kind of socket
each backend type takes. Data only; `options` turns a request into a plan with it.
"""

from __future__ import annotations

from dataclasses import dataclass

from vhostuserd.core.errors import BrokerError, Err

MAX_OPTIONS = 16
MAX_STRING = 4096
MAX_SETTLE_MS = 10_000
DEFAULT_SETTLE_MS = 250
SOCKET_FD = 3

CONNECTED, LISTENING = "connected", "listening"
# Connected: the backend serves the socket it is given (vhost-user-gpu, -input: no accept).
# Listening: it accepts one front-end on it (vhost-user-blk, -scsi, virtiofsd).
SOCKET_KIND = {
    "gpu": CONNECTED,
    "input": CONNECTED,
    "block": LISTENING,
    "scsi": LISTENING,
    "fs": LISTENING,
}

DEVICE_OPTIONS = {"render-node": "/dev/dri/", "evdev-path": "/dev/input/"}
IDMAP_MODES = ("caller", "subids")  # = userns_policy.IDMAP_MODES: the user namespace's id mapping


@dataclass(frozen=True, slots=True)
class OptionSpec:
    signature: str
    btype: str | None  # None: any backend type
    needs_feature: bool


OPTIONS: dict[str, OptionSpec] = {
    "render-node": OptionSpec("s", "gpu", True),
    "virgl": OptionSpec("b", "gpu", True),
    "evdev-path": OptionSpec("s", "input", True),
    "no-grab": OptionSpec("b", "input", True),
    "blk-file": OptionSpec("s", "block", True),
    "read-only": OptionSpec("b", "block", True),
    "shared-dir": OptionSpec("s", "fs", False),
    "idmap": OptionSpec("s", "fs", False),  # the user namespace's id mapping (`userns`)
    "detach": OptionSpec("b", None, False),
    "settle-ms": OptionSpec("u", None, False),
}
PATH_OPTIONS = {"render-node", "evdev-path", "blk-file", "shared-dir"}


class OptionError(BrokerError):
    """A Spawn request the options make impossible: InvalidOption, naming the option."""

    def __init__(self, message: str) -> None:
        super().__init__(Err.INVALID_OPTION, message)
