#!/usr/bin/env python3
"""Leaves a helper behind the way a daemon does: fork, setsid() (a session and process group
of its own, out of the backend's), fork again, SIGTERM ignored; the backend may ignore SIGTERM
too (``ignore_sigterm``). ``burn_s``: the backend first burns that much CPU time."""

import os
import signal
import time

from fakelib import forever, report, start

cfg = start()
if cfg.get("ignore_sigterm"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
burn = float(cfg.get("burn_s", 0))
end = time.process_time() + burn
while time.process_time() < end:
    pass
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.close(r)
        os.write(w, f"{os.getpid()}\n".encode())
        os.close(w)
        forever()
    os._exit(0)
os.close(w)
grandchild = int(os.read(r, 64).decode().strip())
os.close(r)
os.waitpid(-1, 0)
report(
    cfg,
    behaviour="daemonizes",
    grandchild=grandchild,
    grandchild_sid=os.getsid(grandchild),
    burned=time.process_time(),
)
forever()
