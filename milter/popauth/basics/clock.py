"""Time sources, injectable so that expiry can be tested without waiting."""

from __future__ import annotations

import datetime
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


def rfc3339(epoch: float) -> str:
    """A moment as RFC 3339 in UTC, to the second: ``2027-03-01T00:00:00Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def utc_text(epoch: float) -> str:
    """A moment for people, in UTC to the second: ``2027-03-01 00:00:00 UTC``."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def how_long(seconds: float) -> str:
    """A span for people, to its two largest units: "in 3 days 4 h", "2 h 5 min ago"."""
    whole = round(seconds)
    if whole == 0:
        return "now"
    rest = abs(whole)
    parts = []
    for unit, size in (("days", 86_400), ("h", 3_600), ("min", 60), ("s", 1)):
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count} {'day' if unit == 'days' and count == 1 else unit}")
    span = " ".join(parts[:2])
    return f"in {span}" if whole > 0 else f"{span} ago"


def parse_moment(written: str) -> datetime.datetime:
    """``YYYY-MM-DD`` (midnight UTC) or an RFC 3339 date-time; ValueError if neither.

    A date-time without its offset is returned naive: the caller refuses it.
    """
    try:
        if len(written) == len("YYYY-MM-DD"):
            return datetime.datetime.combine(
                datetime.date.fromisoformat(written), datetime.time(), datetime.UTC
            )
        return datetime.datetime.fromisoformat(written)
    except ValueError:
        raise ValueError(
            f"must be an RFC 3339 time such as 2027-03-01T00:00:00Z, not {written[:40]!r}"
        ) from None
