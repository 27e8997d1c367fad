"""The 1,000-backend soak (bench/soak.py), as a slow test: `bash scripts/test -m slow`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from soak import run_soak


@pytest.mark.slow
def test_soak_1000_backends_no_zombie_no_orphan_no_leak_every_exited_once() -> None:
    result = run_soak(1000)
    print(result.summary())
    assert result.ok, result.summary()
