"""From a Spawn request to a backend's command line (docs/contract.md section 3, Spawn options).

Owns which options exist, their D-Bus types, which backend type and capability each needs,
how values are checked (types, absolute paths, no NUL or newline, length caps), how each
maps to argv (virtiofsd: ``--shared-dir=DIR`` with ``separate-options``, else
``-o source=DIR``, as libvirt does), and which kind of socket each backend type takes.
Pure: values in, a plan or an `OptionError` out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vhostuserd.core import adapters
from vhostuserd.core import extras as admin_extras
from vhostuserd.core.descriptors import Capabilities, Descriptor
from vhostuserd.core.extras import Extras
from vhostuserd.core.optiontable import (
    DEFAULT_SETTLE_MS,
    DEVICE_OPTIONS,
    IDMAP_MODES,
    MAX_OPTIONS,
    MAX_SETTLE_MS,
    MAX_STRING,
    OPTIONS,
    PATH_OPTIONS,
    SOCKET_FD,
    SOCKET_KIND,
    OptionError,
)


@dataclass(frozen=True, slots=True)
class SpawnPlan:
    argv: tuple[str, ...]
    detach: bool
    settle_ms: int
    socket_kind: str | None
    values: Mapping[str, Any]  # the validated options, for authorization details
    extra_args: tuple[str, ...] = ()  # what the admin's options.conf added to argv (`extras`)

    @property
    def device_paths(self) -> dict[str, str]:
        return {k: v for k, v in self.values.items() if k in DEVICE_OPTIONS}


def allowed_options(
    d: Descriptor, caps: Capabilities | None, extras: Extras = admin_extras.NONE
) -> list[str]:
    features = set(caps.features) if caps is not None else set()
    return sorted(
        [
            *(
                name
                for name, spec in OPTIONS.items()
                if spec.btype in (None, d.type) and (not spec.needs_feature or name in features)
            ),
            *extras.names,
        ]
    )


def _check_path(name: str, value: str) -> str:
    if not value.startswith("/"):
        raise OptionError(f"option '{name}': must be an absolute path, not {value[:100]!r}")
    if "\0" in value or "\n" in value or "\r" in value:
        raise OptionError(f"option '{name}': must not contain NUL or line breaks")
    if len(value) > MAX_STRING:
        raise OptionError(f"option '{name}': longer than {MAX_STRING} characters")
    return value


def plan(
    d: Descriptor,
    caps: Capabilities | None,
    options: Mapping[str, tuple[str, Any]],
    extras: Extras = admin_extras.NONE,
) -> SpawnPlan:
    """Check ``options`` ({key: (D-Bus signature, value)}) for backend ``d`` and build argv.

    ``caps`` is None when the backend could not be probed: then only options that need no
    capability are accepted. ``extras`` are the admin's vetted options for ``d``
    (`extras.extras_for`): their fixed arguments, and the choices and flags a client may add.
    """
    if len(options) > MAX_OPTIONS:
        raise OptionError(f"too many options ({len(options)} > {MAX_OPTIONS})")
    allowed = allowed_options(d, caps, extras)
    values: dict[str, Any] = {}
    for name, (signature, value) in options.items():
        spec = OPTIONS.get(name)
        extra = extras.signature(name) if spec is None else None
        if extra is not None:
            if signature != extra:
                raise OptionError(
                    f"option '{name}': must have D-Bus type '{extra}', not '{signature}' "
                    f"({extras.source})",
                )
            if (why := admin_extras.check_value(extras, name, value)) is not None:
                raise OptionError(why)
            values[name] = value
            continue
        if spec is None or name not in allowed:
            unknown = f"unknown option (nor one {admin_extras.CONFIG} lists for it)"
            why = (
                unknown
                if spec is None
                else (
                    f"only for {spec.btype} backends"
                    if spec.btype != d.type
                    else f"{d.name} does not list the '{name}' feature"
                )
            )
            shown = name if len(name) <= 64 and name.isprintable() else repr(name[:64])
            raise OptionError(
                f"option '{shown}': {why}; {d.name} ({d.type}) accepts: {', '.join(allowed)}",
            )
        if signature != spec.signature:
            raise OptionError(
                f"option '{name}': must have D-Bus type '{spec.signature}', not '{signature}'",
            )
        if name in PATH_OPTIONS:
            value = _check_path(name, value)
        if name == "idmap" and value not in IDMAP_MODES:
            shown = value[:64] if value.isprintable() else repr(value[:64])
            modes = ", ".join(IDMAP_MODES)
            raise OptionError(f"option 'idmap': must be one of {modes}, not '{shown}'")
        if name == "settle-ms" and value > MAX_SETTLE_MS:
            raise OptionError(f"option 'settle-ms': at most {MAX_SETTLE_MS}")
        values[name] = value
    if d.adapter is not None:  # the admin's argv template (`adapters`), not the conventions'
        argv = adapters.argv(d.adapter, d.binary, d.name, values)
    else:
        argv = _conventional_argv(d, caps, values)
    extra_args = admin_extras.arguments(extras, values)
    argv += extra_args
    return SpawnPlan(
        argv=tuple(argv),
        detach=bool(values.get("detach", False)),
        settle_ms=int(values.get("settle-ms", DEFAULT_SETTLE_MS)),
        socket_kind=socket_kind_of(d),
        values=values,
        extra_args=tuple(extra_args),
    )


def socket_kind_of(d: Descriptor) -> str | None:
    """connected | listening | None (not known: any stream socket is passed on)."""
    if d.adapter is not None and d.adapter.socket is not None:
        return d.adapter.socket
    return SOCKET_KIND.get(d.type)


def _conventional_argv(
    d: Descriptor, caps: Capabilities | None, values: Mapping[str, Any]
) -> list[str]:
    """``BINARY --fd=3 [options]``, as QEMU's backend program conventions say."""
    argv = [d.binary, f"--fd={SOCKET_FD}"]
    for name in ("render-node", "evdev-path", "blk-file"):
        if name in values:
            argv.append(f"--{name}={values[name]}")
    for name in ("virgl", "no-grab", "read-only"):
        if values.get(name):
            argv.append(f"--{name}")
    if "shared-dir" in values:
        directory = values["shared-dir"]
        if caps is not None and "separate-options" in caps.features:
            argv.append(f"--shared-dir={directory}")
        else:
            if "," in directory:
                # The -o list is comma-separated: a comma would smuggle in another option.
                raise OptionError(
                    f"option 'shared-dir': {d.name} takes it as '-o source=DIR', where a comma "
                    "would start another option; choose a directory without ','",
                )
            argv += ["-o", f"source={directory}"]
    return argv
