#!/usr/bin/env python3
"""Prints ``lines`` numbered lines (about 64 bytes each) alternately on stdout and stderr,
then an end marker, then serves until SIGTERM."""

import sys

from fakelib import forever, report, start

cfg = start()
filler = "x" * 48
for i in range(int(cfg.get("lines", 4000))):
    stream = sys.stdout if i % 2 == 0 else sys.stderr
    stream.write(f"line {i:07d} {filler}\n")
sys.stdout.flush()
sys.stderr.write("chatty: END OF OUTPUT\n")
sys.stderr.flush()
report(cfg, behaviour="chatty")
forever()
