"""Time sources, injectable so that expiry can be tested without waiting."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never jumps: measures TTLs."""

    def time(self) -> float:
        """Seconds since the epoch: for people and for other hosts."""


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()
