#!/usr/bin/env python3
"""Forks a helper that stays in the backend's process group and ignores SIGTERM, as a
backend's worker might. ``ignore_sigterm``: the backend itself ignores SIGTERM too.
``exit_after``: the backend exits by itself after that many seconds, leaving the helper."""

import os
import signal
import sys
import time

from fakelib import forever, report, start

cfg = start()
if cfg.get("ignore_sigterm"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
r, w = os.pipe()
child = os.fork()
if child == 0:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.close(r)
    os.close(w)
    forever()
os.close(w)
report(cfg, behaviour="forks-grandchild", grandchild=child, grandchild_pgid=os.getpgid(child))
if cfg.get("exit_after") is not None:
    time.sleep(float(cfg["exit_after"]))
    sys.exit(int(cfg.get("status", 3)))
forever()
