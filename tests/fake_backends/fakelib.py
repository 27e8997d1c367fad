"""Shared by the fake backends: their configuration, --print-capabilities, and reports.

A fake backend is installed (tests/helpers_spawn.py, `install`) as an executable copy with
this module next to it and a configuration ``<binary>.conf.json``: the capabilities it
prints (``type``, ``features``), where it reports (``report_dir``), and what each
behaviour needs. Standard library only: the copies run with ``python -S``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any


def start() -> dict[str, Any]:
    """Load the configuration; answer --print-capabilities and exit as a real backend does."""
    with open(sys.argv[0] + ".conf.json") as f:
        cfg: dict[str, Any] = json.load(f)
    if "--print-capabilities" in sys.argv[1:]:
        caps: dict[str, Any] = {"type": cfg["type"]}
        if cfg.get("features") is not None:
            caps["features"] = cfg["features"]
        print(json.dumps(caps), flush=True)
        sys.exit(0)
    return cfg


def report(cfg: dict[str, Any], **data: Any) -> None:
    """Write ``data`` (with pid and argv) to REPORT_DIR/PID.json, atomically, and to stderr."""
    data = {"pid": os.getpid(), "argv": sys.argv[1:], **data}
    text = json.dumps(data)
    print(f"fake backend report: {text}", file=sys.stderr, flush=True)
    directory = cfg.get("report_dir")
    if directory:
        path = os.path.join(directory, f"{os.getpid()}.json")
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)


def forever() -> None:
    while True:
        signal.pause()
