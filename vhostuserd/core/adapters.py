"""Adapter descriptors: backends that do not follow QEMU's conventions (issue 15 items 1, 2).

A descriptor of the data or sysconf tier (never the user tier) may carry
``"x-vhostuserd-adapter"``: the backend's capabilities, stated by the admin instead of probed
(``--print-capabilities`` is never run), and how its command line is built from an argv
template with typed placeholders::

    "x-vhostuserd-adapter": {
      "features": ["blk-file", "read-only"],
      "socket": "listening",
      "argv": ["--blockdev", "driver=file,node-name=f0,filename={blk-file}",
               "--export", "type=vhost-user-blk,node-name=f0,addr.type=fd,addr.str={fd}"],
      "options": {"read-only": ["--read-only-marker"]}
    }

Placeholders: ``{fd}`` (the socket's fd number, 3), ``{fd-path}`` (``/proc/self/fd/3``, for
a backend that takes a path and accepts that one), ``{NAME}`` (the value of string Spawn
option NAME: one in ``argv`` makes the option required) and ``{NAME?IF-TRUE:IF-FALSE}`` (a
boolean option, absent is false). ``options`` maps an option to the arguments it adds when
given (a string option) or true (a boolean). ``{{`` and ``}}`` are literal braces. An option
needing a feature may appear only when ``features`` lists it; the socket must be passed.

Client values never become free arguments: a value substituted into a placeholder may not
start with ``-`` nor contain NUL or a line break, and inside an argument whose literal text
has a ``,`` (a QEMU option string such as qemu-storage-daemon's ``--export``) not a ``,``;
each is `OptionError` ``InvalidOption`` naming the option. Pure: parsing and rendering only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vhostuserd.core.optiontable import (
    CONNECTED,
    LISTENING,
    OPTIONS,
    SOCKET_FD,
    SOCKET_KIND,
    OptionError,
)

KEY = "x-vhostuserd-adapter"
TRUSTED_TIERS = ("data", "sysconf", "check")  # "check": `vhostuserctl check FILE`, never run
MAX_ARGS = 128
MAX_ARG = 4096
FD, FD_PATH = "fd", "fd-path"
# Options that shape the spawn itself, never argv.
NOT_PLACEHOLDERS = frozenset({"detach", "settle-ms", "idmap"})
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([a-z][a-z0-9-]*)(?:\?([^{}:]*):([^{}:]*))?\}|[{}]")


class AdapterError(ValueError):
    """An adapter the descriptor's author got wrong: 'POINTER: sentence'."""


@dataclass(frozen=True, slots=True)
class Part:
    """One piece of a template argument: a literal, or a placeholder."""

    literal: str = ""
    name: str | None = None  # fd, fd-path or an option
    if_true: str | None = None  # set for {NAME?T:F}
    if_false: str | None = None


@dataclass(frozen=True, slots=True)
class Template:
    parts: tuple[Part, ...]

    @property
    def option_string(self) -> bool:
        """A QEMU option string: a ',' in its literal text separates key=value pairs."""
        return any("," in p.literal for p in self.parts)

    @property
    def names(self) -> set[str]:
        return {p.name for p in self.parts if p.name is not None}


@dataclass(frozen=True, slots=True)
class Adapter:
    features: tuple[str, ...]
    argv: tuple[Template, ...]
    options: tuple[tuple[str, tuple[Template, ...]], ...]
    socket: str | None  # connected | listening, None: the type's (options.SOCKET_KIND)

    @property
    def required(self) -> set[str]:
        """String options the fixed argv needs."""
        return {
            p.name
            for t in self.argv
            for p in t.parts
            if p.name not in (None, FD, FD_PATH) and p.if_true is None
        }

    @property
    def used(self) -> set[str]:
        used = {n for t in self.argv for n in t.names}
        for name, templates in self.options:
            used.add(name)
            used.update(n for t in templates for n in t.names)
        return used - {FD, FD_PATH}


def _template(text: Any, where: str, btype: str, features: set[str]) -> Template:
    if type(text) is not str:
        raise AdapterError(f"{where}: must be a string")
    if not text or "\0" in text or "\n" in text or "\r" in text or len(text) > MAX_ARG:
        raise AdapterError(
            f"{where}: an argument is 1 to {MAX_ARG} characters, without NUL or line breaks"
        )
    parts: list[Part] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(text):
        if m.start() > pos:
            parts.append(Part(text[pos : m.start()]))
        pos = m.end()
        token = m.group(0)
        if token in ("{{", "}}"):
            parts.append(Part(token[0]))
            continue
        name = m.group(1)
        if name is None:
            raise AdapterError(f"{where}: a lone '{token}' (write '{token * 2}' for a literal one)")
        boolean = m.group(2) is not None
        if name in (FD, FD_PATH):
            if boolean:
                raise AdapterError(f"{where}: {{{name}}} takes no ?TRUE:FALSE")
            parts.append(Part(name=name))
            continue
        spec = OPTIONS.get(name)
        if spec is None or name in NOT_PLACEHOLDERS:
            names = ", ".join(sorted(set(OPTIONS) - NOT_PLACEHOLDERS))
            raise AdapterError(f"{where}: unknown placeholder {{{name}}} (fd, fd-path, {names})")
        if spec.btype not in (None, btype):
            raise AdapterError(
                f"{where}: {{{name}}} is an option of {spec.btype} backends, not {btype}"
            )
        if spec.needs_feature and name not in features:
            raise AdapterError(f"{where}: {{{name}}} needs '{name}' in features")
        if (spec.signature == "b") != boolean:
            form = f"{{{name}?IF-TRUE:IF-FALSE}}" if spec.signature == "b" else f"{{{name}}}"
            raise AdapterError(
                f"{where}: option '{name}' has type '{spec.signature}': write {form}"
            )
        parts.append(Part(name=name, if_true=m.group(2), if_false=m.group(3)))
    if pos < len(text):
        parts.append(Part(text[pos:]))
    return Template(tuple(parts))


def _templates(value: Any, where: str, btype: str, features: set[str]) -> tuple[Template, ...]:
    if type(value) is not list:
        raise AdapterError(f"{where}: must be a list of strings")
    if len(value) > MAX_ARGS:
        raise AdapterError(f"{where}: more than {MAX_ARGS} arguments")
    return tuple(_template(v, f"{where}/{i}", btype, features) for i, v in enumerate(value))


def parse(document: Any, btype: str, tier: str) -> Adapter:
    """Validate the value of ``x-vhostuserd-adapter`` of a descriptor of type ``btype``."""
    where = "/" + KEY
    if tier not in TRUSTED_TIERS:
        raise AdapterError(
            f"{where}: an adapter is trusted only from the data and sysconf tiers, "
            f"not the {tier} tier"
        )
    if type(document) is not dict:
        raise AdapterError(f"{where}: must be a JSON object")
    unknown = sorted(set(document) - {"features", "argv", "options", "socket"})
    if unknown:
        raise AdapterError(f"{where}/{unknown[0]}: unknown key (features, argv, options, socket)")
    features = document.get("features", [])
    if type(features) is not list or not all(type(f) is str and f for f in features):
        raise AdapterError(f"{where}/features: must be a list of non-empty strings")
    fset = set(features)
    if "argv" not in document:
        raise AdapterError(f"{where}: missing required key 'argv'")
    argv = _templates(document["argv"], f"{where}/argv", btype, fset)
    raw_options = document.get("options", {})
    if type(raw_options) is not dict:
        raise AdapterError(f"{where}/options: must be a JSON object")
    options: list[tuple[str, tuple[Template, ...]]] = []
    for name, value in raw_options.items():
        spec = OPTIONS.get(name)
        if spec is None or name in NOT_PLACEHOLDERS or spec.btype not in (None, btype):
            raise AdapterError(
                f"{where}/options/{name}: not an option of {btype} backends that "
                "turns into arguments"
            )
        if spec.needs_feature and name not in fset:
            raise AdapterError(f"{where}/options/{name}: needs '{name}' in features")
        options.append((name, _templates(value, f"{where}/options/{name}", btype, fset)))
    socket = document.get("socket")
    if socket is not None and socket not in (CONNECTED, LISTENING):
        raise AdapterError(f"{where}/socket: must be '{CONNECTED}' or '{LISTENING}'")
    if socket is None and btype not in SOCKET_KIND:
        raise AdapterError(
            f"{where}/socket: required for type '{btype}' ('{CONNECTED}' or "
            f"'{LISTENING}': what the backend does with its socket)"
        )
    adapter = Adapter(tuple(features), argv, tuple(options), socket)
    if not any(p.name in (FD, FD_PATH) for t in argv for p in t.parts):
        raise AdapterError(f"{where}/argv: must pass the socket, with {{{FD}}} or {{{FD_PATH}}}")
    unused = sorted(f for f in fset if f in OPTIONS and f not in adapter.used)
    if unused:
        raise AdapterError(f"{where}/features: '{unused[0]}' is listed but no argument uses it")
    return adapter


def _value(name: str, value: Any, t: Template) -> str:
    text = str(value)
    if text.startswith("-"):
        raise OptionError(
            f"option '{name}': must not start with '-' (it would become an option of the backend)",
        )
    if "\0" in text or "\n" in text or "\r" in text:
        raise OptionError(f"option '{name}': must not contain NUL or line breaks")
    if "," in text and t.option_string:
        raise OptionError(
            f"option '{name}': must not contain ',' (it goes into an "
            "option string, where a comma would start another option)",
        )
    return text


def _render(t: Template, values: Mapping[str, Any]) -> str:
    out = []
    for p in t.parts:
        if p.name is None:
            out.append(p.literal)
        elif p.name == FD:
            out.append(str(SOCKET_FD))
        elif p.name == FD_PATH:
            out.append(f"/proc/self/fd/{SOCKET_FD}")
        elif p.if_true is not None:
            out.append(p.if_true if values.get(p.name) is True else p.if_false or "")
        else:
            out.append(_value(p.name, values[p.name], t))
    return "".join(out)


def argv(a: Adapter, binary: str, name: str, values: Mapping[str, Any]) -> list[str]:
    """The command line for options ``values`` (already checked by `options.plan`)."""
    given = {k for k in values if k in OPTIONS and k not in NOT_PLACEHOLDERS}
    unused = sorted(given - a.used)
    if unused:
        raise OptionError(f"option '{unused[0]}': the adapter of {name} does not use it")
    missing = sorted(a.required - given)
    if missing:
        raise OptionError(f"option '{missing[0]}': required by the adapter of {name}")
    out = [binary, *(_render(t, values) for t in a.argv)]
    for option, templates in a.options:
        given_value = values.get(option)
        if given_value is None or given_value is False:
            continue
        out.extend(_render(t, values) for t in templates)
    return out
