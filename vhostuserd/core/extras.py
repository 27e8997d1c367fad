"""Admin-vetted extra arguments per descriptor: ``SYSCONFDIR/vhostuserd/options.conf`` (issue 15).

The admin, never a client, lists for a descriptor (``[DESCRIPTOR-NAME]``) or a backend type
(``[type:TYPE]``, the descriptor's own section overriding it key by key):

* ``fixed = ARG ...``: arguments always passed (shell-like words, no expansion);
* ``choice.NAME = TEMPLATE VALUE ...``: a Spawn option NAME (D-Bus type ``s``) whose value
  must be one of the VALUEs; it becomes TEMPLATE with ``{}`` replaced by the value
  (``choice.log-level = --log-level={} error warn info debug``);
* ``flag.NAME = ARG ...``: a Spawn option NAME (``b``) that, when true, passes the ARGs
  (``flag.xattr = --xattr``);
* ``respawn = N T``: a listening-socket backend that exits on its own after a settled start
  is started again on the same socket, at most N times in T seconds (`Spawner`).

A client picks among these only; any other option stays refused (`options.plan`). The
chosen options and the arguments they add are polkit details (`policy.ask_to_spawn`).
Pure, except `load`, which reads the file.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field

from vhostuserd.core import sysconf
from vhostuserd.core.errors import BrokerError, Err

CONFIG = "vhostuserd/options.conf"  # under the sysconf tier's root (default /etc)
MAX_ARGS = 64
MAX_RESPAWN = 100
NAME = re.compile(r"[a-z][a-z0-9-]{0,63}")
VALUE = re.compile(r"[A-Za-z0-9_.:+=/@][A-Za-z0-9_.:+=/@-]{0,127}")
# Spawn options of the contract and polkit detail keys the daemon sets itself: an extra
# option may not shadow one (a polkit rule must be able to trust "descriptor", say).
RESERVED = frozenset(
    {
        "render-node",
        "virgl",
        "evdev-path",
        "no-grab",
        "blk-file",
        "read-only",
        "shared-dir",
        "idmap",
        "detach",
        "settle-ms",
        "descriptor",
        "type",
        "binary",
        "flatpak-app-id",
        "extra-args",
        "backend",
        "owner-uid",
        "list",
        "fixed",
    }
)


class ExtrasError(BrokerError):
    """The admin's options.conf is wrong (SpawnFailed); the message names the file, section and
    setting."""

    def __init__(self, message: str) -> None:
        super().__init__(Err.SPAWN_FAILED, message)


@dataclass(frozen=True, slots=True)
class Choice:
    template: str  # contains "{}" exactly once
    values: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Extras:
    """What one descriptor's backends may get beyond the contract's options."""

    fixed: tuple[str, ...] = ()
    choices: Mapping[str, Choice] = field(default_factory=dict)
    flags: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    source: str = ""
    respawn: tuple[int, int] | None = None  # (N, T): at most N restarts in T seconds

    def signature(self, name: str) -> str | None:
        """The D-Bus type of extra option ``name``, or None when the admin did not list it."""
        return "s" if name in self.choices else "b" if name in self.flags else None

    @property
    def names(self) -> list[str]:
        return sorted([*self.choices, *self.flags])


NONE = Extras()


def _words(value: str, where: str) -> list[str]:
    try:
        words = shlex.split(value, comments=False, posix=True)
    except ValueError as e:
        raise ExtrasError(f"{where}: {e}") from None
    if len(words) > MAX_ARGS:
        raise ExtrasError(f"{where}: more than {MAX_ARGS} arguments")
    for w in words:
        if "\0" in w or "\n" in w or "\r" in w or not w:
            raise ExtrasError(
                f"{where}: {w!r}: an argument must be non-empty, without NUL or line breaks"
            )
    return words


def _check_key(key: str, where: str) -> tuple[str, str]:
    kind, _, name = key.partition(".")
    if kind not in ("choice", "flag") or not name:
        raise ExtrasError(
            f"{where} {key}: unknown setting (fixed, choice.NAME, flag.NAME, respawn)"
        )
    if not NAME.fullmatch(name):
        raise ExtrasError(
            f"{where} {key}: an option name is lower-case letters, digits and '-', "
            "starting with a letter, at most 64"
        )
    if name in RESERVED:
        raise ExtrasError(
            f"{where} {key}: '{name}' is an option or polkit detail of vhostuserd itself"
        )
    return kind, name


def respawn_limit(value: str, where: str) -> tuple[int, int]:
    """``N T``: at most N restarts (1 to 100) in T seconds (1 to 3600)."""
    parts = value.split()
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        n, t = int(parts[0]), int(parts[1])
        if 1 <= n <= MAX_RESPAWN and 1 <= t <= 3600:
            return n, t
    raise ExtrasError(
        f"{where} = {value!r}: N T, at most N restarts (1 to {MAX_RESPAWN}) in T seconds "
        "(1 to 3600)"
    )


def parse_config(text: str, path: str) -> dict[str, dict[str, str]]:
    """Validate options.conf: every section's settings, raw but known to be well formed."""
    try:
        sections = sysconf.parse(text, path)
    except sysconf.SysconfError as e:
        raise ExtrasError(str(e)) from None
    for section, values in sections.items():
        where = f"{path}: [{section}]"
        for key, value in values.items():
            if key == "fixed":
                _words(value, f"{where} fixed")
                continue
            if key == "respawn":
                respawn_limit(value, f"{where} respawn")
                continue
            kind, _ = _check_key(key, where)
            words = _words(value, f"{where} {key}")
            if kind == "flag" and not words:
                raise ExtrasError(f"{where} {key}: the arguments the flag passes are missing")
            if kind == "choice":
                if len(words) < 2 or words[0].count("{}") != 1:
                    raise ExtrasError(
                        f"{where} {key} = {value!r}: TEMPLATE VALUE ..., the template "
                        "with '{}' once for the value, then the values a client may pick"
                    )
                bad = [v for v in words[1:] if not VALUE.fullmatch(v)]
                if bad:
                    raise ExtrasError(
                        f"{where} {key}: value {bad[0]!r}: letters, digits and _.:+=/@-, "
                        "not starting with '-', at most 128"
                    )
    return sections


def extras_for(
    dtype: str, name: str, config: Mapping[str, Mapping[str, str]], path: str = CONFIG
) -> Extras:
    """The extras of descriptor ``name`` of type ``dtype``: ``[type:TYPE]``, then ``[NAME]``."""
    merged: dict[str, str] = {}
    sources = []
    for section in sysconf.sections_for(dtype, name):
        if section in config:
            merged.update(config[section])
            sources.append(f"{path} [{section}]")
    if not merged:
        return NONE
    choices: dict[str, Choice] = {}
    flags: dict[str, tuple[str, ...]] = {}
    fixed: tuple[str, ...] = ()
    respawn = None
    for key, value in merged.items():
        if key == "respawn":
            respawn = respawn_limit(value, key)
            continue
        words = tuple(shlex.split(value))
        if key == "fixed":
            fixed = words
        elif key.startswith("choice."):
            choices[key[len("choice.") :]] = Choice(words[0], words[1:])
        else:
            flags[key[len("flag.") :]] = words
    return Extras(fixed, choices, flags, ", ".join(sources), respawn)


def arguments(extras: Extras, values: Mapping[str, object]) -> list[str]:
    """The argv tail: the fixed arguments, then each chosen option's, in name order."""
    out = list(extras.fixed)
    for name in sorted(values):
        if name in extras.choices:
            out.append(extras.choices[name].template.replace("{}", str(values[name])))
        elif name in extras.flags and values[name] is True:
            out.extend(extras.flags[name])
    return out


def check_value(extras: Extras, name: str, value: object) -> str | None:
    """Why ``value`` is not allowed for extra option ``name``, or None."""
    choice = extras.choices.get(name)
    if choice is not None and value not in choice.values:
        shown = str(value)[:64] if str(value).isprintable() else repr(str(value)[:64])
        return (
            f"option '{name}': must be one of {', '.join(choice.values)} ({extras.source}), "
            f"not '{shown}'"
        )
    return None
