"""The records of running backends in the state directory (/run/vhostuserd, or
$XDG_RUNTIME_DIR/vhostuserd for a session daemon): one small JSON file per backend
(``backend-ID.json``), written atomically at its spawn and once its process is identified,
removed at its exit, so that a restarted daemon (even after SIGKILL) finds the backends still
alive (`readopt`); and ``next-id``, the bound below which ids are reserved, so that no id is
ever used twice.

A record is only a hint: each field is checked as it is loaded, and a damaged record is
quarantined (``.bad``) for a human to look at, never trusted and never deleted."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

from vhostuserd.edges.backend import Backend

log = logging.getLogger("vhostuserd.records")

ID_BLOCK = 64
_RECORD = re.compile(r"backend-(.*)\.json")


def _fields(b: Backend) -> dict[str, Any]:
    """What the record of ``b`` holds."""
    return {
        "id": b.id,
        "descriptor": b.descriptor,
        "binary": b.binary,
        "argv": list(b.argv),
        "pid": b.pid,
        "owner": b.owner,
        "owner_uid": b.owner_uid,
        "detached": b.detached,
        "started_at": b.started_at,
        "start_time": b.start_time,
        "exe": b.exe,
        "log_pipe": b.log_pipe,
        "cgroup": b.cgroup,
    }


def _is_int(v: Any, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


_CHECKS: dict[str, Callable[[Any], bool]] = {
    "descriptor": lambda v: isinstance(v, str),
    "binary": lambda v: isinstance(v, str),
    "argv": lambda v: isinstance(v, list) and bool(v) and all(isinstance(a, str) for a in v),
    "pid": lambda v: _is_int(v, 2),
    "owner": lambda v: isinstance(v, str),
    "owner_uid": lambda v: _is_int(v),
    "detached": lambda v: isinstance(v, bool),
    "started_at": lambda v: _is_int(v),
    "start_time": lambda v: _is_int(v),
    "exe": lambda v: isinstance(v, str),
    "log_pipe": lambda v: isinstance(v, str),
    "cgroup": lambda v: isinstance(v, str),
}


def _load_record(path: str, backend_id: str) -> tuple[dict[str, Any], list[str]]:
    """The fields of a record that are sound, and what is wrong with the rest."""
    try:
        with open(path, "rb") as f:
            raw = json.loads(f.read(1 << 20))
    except (OSError, ValueError) as e:
        return {}, [f"unreadable ({e})"]
    if not isinstance(raw, dict):
        return {}, [f"not a JSON object but {type(raw).__name__}"]
    good = {k: raw[k] for k, ok in _CHECKS.items() if k in raw and ok(raw[k])}
    bad = [k for k in _CHECKS if k not in good and k not in ("log_pipe", "cgroup")]
    if raw.get("id") != backend_id:
        bad.insert(0, "id")
    return good, bad


class Records:
    """The state directory, made (mode 0700) if it is not there; raises OSError if it cannot
    be."""

    def __init__(self, state_dir: str) -> None:
        self.dir = state_dir
        self._id_next = 0
        self._id_reserved = 0
        os.makedirs(state_dir, mode=0o700, exist_ok=True)

    def next_id(self, in_use: Iterable[str]) -> str:
        """Ids are never reused, across restarts too: the state dir holds a bound that the
        daemon reserves ids below, a block at a time (so a spawn rarely writes it).
        ``in_use``: the ids of the backends this daemon has (re-adopted ones too)."""
        if self._id_next >= self._id_reserved:
            path = os.path.join(self.dir, "next-id")
            if self._id_reserved == 0:
                try:
                    with open(path) as f:
                        self._id_next = max(1, int(f.read().strip() or "1"))
                except (OSError, ValueError):
                    self._id_next = 1
                self._id_next = max(self._id_next, *(int(i) + 1 for i in in_use if i.isdigit()), 1)
            self._id_reserved = self._id_next + ID_BLOCK
            self._write_atomic(path, f"{self._id_reserved}\n")
        n = self._id_next
        self._id_next += 1
        return str(n)

    def _write_atomic(self, path: str, text: str) -> None:
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)

    def path(self, backend_id: str) -> str:
        return os.path.join(self.dir, f"backend-{backend_id}.json")

    def ids(self) -> list[str]:
        """The ids that have a record, in the order of their file names."""
        names = sorted(os.listdir(self.dir))
        return [m.group(1) for n in names if (m := _RECORD.fullmatch(n))]

    def load(self, backend_id: str) -> tuple[dict[str, Any], list[str]]:
        """The sound fields of the backend's record, and what is wrong with the rest
        (``["missing"]`` if it has none)."""
        if not self.has(backend_id):
            return {}, ["missing"]
        return _load_record(self.path(backend_id), backend_id)

    def save(self, b: Backend) -> None:
        self._write_atomic(self.path(b.id), json.dumps(_fields(b)))

    def has(self, backend_id: str) -> bool:
        return os.path.exists(self.path(backend_id))

    def forget(self, backend_id: str) -> None:
        try:
            os.unlink(self.path(backend_id))
        except FileNotFoundError:
            pass

    def quarantine(self, backend_id: str, why: str) -> None:
        """Keep a record that cannot be trusted for a human to look at, out of our way."""
        path = self.path(backend_id)
        dest, n = f"{path}.bad", 1
        while os.path.exists(dest):
            dest, n = f"{path}.bad.{n}", n + 1
        try:
            os.replace(path, dest)
        except OSError as e:
            log.warning("%s: %s; cannot quarantine it: %s", path, why, e.strerror)
            return
        log.warning("%s: %s; quarantined as %s", path, why, dest)
