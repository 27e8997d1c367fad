"""Reading the admin's settings files, ``SYSCONFDIR/vhostuserd/*.conf``: the one place they are
opened (their format and each file's keys: `vhostuserd.core.sysconf` and the owners)."""

from __future__ import annotations

import os

from vhostuserd.core import extras
from vhostuserd.core.sysconf import MAX_BYTES, SysconfError


def read(sysconfdir: str, name: str) -> tuple[str | None, str]:
    """The text of ``SYSCONFDIR/NAME`` (None when there is no such file) and its path."""
    path = os.path.join(sysconfdir, name)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return None, path
    except OSError as e:
        raise SysconfError(f"{path}: {e.strerror}") from None
    if len(raw) > MAX_BYTES:
        raise SysconfError(f"{path}: larger than {MAX_BYTES} bytes")
    return raw.decode("utf-8", "replace"), path


def load_options(sysconfdir: str) -> tuple[dict[str, dict[str, str]], str]:
    """Read and validate ``SYSCONFDIR/vhostuserd/options.conf`` (absent: no extras)."""
    try:
        text, path = read(sysconfdir, extras.CONFIG)
    except SysconfError as e:
        raise extras.ExtrasError(str(e)) from None
    return ({} if text is None else extras.parse_config(text, path)), path
