"""How much of the backends' output reaches the daemon's log: a token bucket per backend and
one for all of them together (the supervisor counts the lines they hold back, and says so).
GetLog keeps the last 64 KiB of a backend's output whatever the rate."""

from __future__ import annotations

import time

LOG_LINES_PER_S, LOG_BURST = 20, 200  # lines per backend into the daemon's log
LOG_LINES_PER_S_ALL, LOG_BURST_ALL = 200, 1000  # lines of all backends together


class Bucket:
    """A token bucket: ``rate`` per second, at most ``burst`` at once."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.last = time.monotonic()

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False
