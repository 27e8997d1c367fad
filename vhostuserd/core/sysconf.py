"""The admin's settings files, ``SYSCONFDIR/vhostuserd/*.conf`` (userns.conf, cgroup.conf,
options.conf): one format and one way of reading them.

INI with ``[type:TYPE]`` and ``[DESCRIPTOR-NAME]`` sections, ``#`` and ``;`` comments (inline
too), no interpolation and no default section; at most 64 KiB. `parse` is pure;
`vhostuserd.edges.settings.read` is the one file read. Each owner validates its own keys and
raises its own typed error with the message of a `SysconfError`, which names the file.
"""

from __future__ import annotations

import configparser

MAX_BYTES = 64 * 1024


class SysconfError(Exception):
    """A settings file that cannot be read or parsed; the message starts with its path."""


def parse(text: str, path: str) -> dict[str, dict[str, str]]:
    """Each section's settings, raw, in file order."""
    parser = configparser.ConfigParser(
        interpolation=None,
        default_section="\0none",
        comment_prefixes=("#", ";"),
        inline_comment_prefixes=("#", ";"),
    )
    try:
        parser.read_string(text, source=path)
    except configparser.Error as e:
        raise SysconfError(f"{path}: {str(e).splitlines()[0]}") from None
    return {section: dict(parser.items(section)) for section in parser.sections()}


def sections_for(dtype: str, name: str) -> tuple[str, str]:
    """The sections that apply to descriptor ``name`` of type ``dtype``, the later winning."""
    return (f"type:{dtype}", name)
