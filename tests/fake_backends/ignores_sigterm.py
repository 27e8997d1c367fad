#!/usr/bin/env python3
"""Ignores SIGTERM: only SIGKILL ends it."""

import signal

from fakelib import forever, report, start

cfg = start()
signal.signal(signal.SIGTERM, signal.SIG_IGN)
report(cfg, behaviour="ignores-sigterm")
forever()
