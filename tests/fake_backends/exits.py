#!/usr/bin/env python3
"""Says something on stderr and exits: at once (exit 1) by default, or after ``delay`` seconds
with ``status``, or killed by its own ``signal``. Output before the end: ``lines`` lines."""

import os
import sys
import time

from fakelib import report, start

cfg = start()
report(cfg, behaviour="exits")
for i in range(int(cfg.get("lines", 0))):
    print(f"early line {i}", file=sys.stderr)
print(cfg.get("message", "fake backend: cannot serve, giving up"), file=sys.stderr, flush=True)
time.sleep(float(cfg.get("delay", 0)))
if cfg.get("signal"):
    os.kill(os.getpid(), int(cfg["signal"]))
    time.sleep(10)
sys.exit(int(cfg.get("status", 1)))
