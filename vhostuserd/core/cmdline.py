"""The daemon's command line: its options, their defaults and checks, and what they parse to.
Read by the daemon (`vhostuserd.daemon`) and by the man page generator (`vhostuserd.cli.manpage`).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class Options:
    bus: str  # "system", "user" or "address"
    address: str | None
    system_tiers: bool
    sysconfdir: str
    idle_timeout: float
    grace_period: float
    probe_timeout: float
    state_dir: str | None
    log_level: str
    max_backends: int = 1024
    max_backends_per_user: int = 64


def _nonnegative(value: str) -> float:
    try:
        f = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if f < 0 or not math.isfinite(f):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, not {value!r}")
    return f


def _positive(value: str) -> float:
    f = _nonnegative(value)
    if f == 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return f


def build_parser(version: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vhostuserd",
        description="The vhost-user backend broker: a D-Bus service that resolves QEMU "
        "vhost-user backend descriptors and spawns and supervises backends for its clients.",
    )
    p.add_argument("--version", action="version", version=f"vhostuserd {version}")
    bus = p.add_mutually_exclusive_group()
    bus.add_argument(
        "--user",
        action="store_true",
        help="serve on the session bus; search the data, sysconf and user tiers (default)",
    )
    bus.add_argument(
        "--address",
        metavar="ADDR",
        help="serve on this bus address (tiers as --user unless --system is also given)",
    )
    p.add_argument(
        "--system",
        action="store_true",
        help="serve on the system bus; search only the data and sysconf tiers",
    )
    p.add_argument(
        "--sysconfdir",
        default="/etc",
        metavar="DIR",
        help="root of the sysconf tier: DIR/qemu/vhost-user (default /etc)",
    )
    p.add_argument(
        "--idle-timeout",
        type=_nonnegative,
        default=0.0,
        metavar="SEC",
        help="exit after SEC seconds with no backend and no call; 0 never (default 0)",
    )
    p.add_argument(
        "--grace-period",
        type=_positive,
        default=5.0,
        metavar="SEC",
        help="time between SIGTERM and SIGKILL when stopping a backend (default 5)",
    )
    p.add_argument(
        "--probe-timeout",
        type=_positive,
        default=5.0,
        metavar="SEC",
        help="time limit for BINARY --print-capabilities (default 5)",
    )
    p.add_argument(
        "--max-backends",
        type=int,
        default=1024,
        metavar="N",
        help="at most N backends at once (default 1024)",
    )
    p.add_argument(
        "--max-backends-per-user",
        type=int,
        default=64,
        metavar="N",
        help="at most N backends at once per uid (default 64)",
    )
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        help="where running backends are recorded (default $XDG_RUNTIME_DIR/vhostuserd, "
        "/run/vhostuserd with --system)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        type=str.lower,
        choices=["debug", "info", "warning", "error"],
        help="default info",
    )
    return p


def parse_options(argv: Sequence[str] | None, version: str) -> Options:
    p = build_parser(version)
    a = p.parse_args(argv)
    if a.system and a.user:
        p.error("--system and --user cannot be combined")
    bus = "address" if a.address else ("system" if a.system else "user")
    return Options(
        bus=bus,
        address=a.address,
        system_tiers=bool(a.system),
        sysconfdir=a.sysconfdir,
        idle_timeout=a.idle_timeout,
        grace_period=a.grace_period,
        probe_timeout=a.probe_timeout,
        state_dir=a.state_dir,
        log_level=a.log_level,
        max_backends=a.max_backends,
        max_backends_per_user=a.max_backends_per_user,
    )
