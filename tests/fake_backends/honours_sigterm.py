#!/usr/bin/env python3
"""Serves until SIGTERM, which (default disposition) ends it at once."""

from fakelib import forever, report, start

cfg = start()
report(cfg, behaviour="honours-sigterm")
forever()
