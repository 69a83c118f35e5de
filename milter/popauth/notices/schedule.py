"""When a user is due a notice: pure functions of times, no I/O.

A notice goes out while POP-first still relays and either a retirement date
is set or ``pop_first = "warn"``; to each user at most once per interval,
and once more in the final week before the retirement date. When a notice
is sent, the time the next one becomes due is fixed with it
(:meth:`NoticeSchedule.next_due`): the file ledger keeps it and Redis lets
the user's key expire then, so every host reads the same answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime

FINAL_WEEK = 7 * 86_400.0
DAY = 86_400.0


@dataclass(frozen=True, slots=True)
class NoticeSchedule:
    """The rule, from the settings: ``retire_at`` in epoch seconds (None: no date)."""

    interval: float
    retire_at: float | None = None
    # pop_first = "warn": notices without a date too.
    warn: bool = False
    # pop_first = "off": POP-first relays no more, so nobody is told to leave it.
    retired: bool = False

    def active(self, now: float) -> bool:
        """Whether notices go out at all at ``now``."""
        if self.retired:
            return False
        if self.retire_at is None:
            return self.warn
        return now < self.retire_at

    def final_week_starts(self) -> float | None:
        return None if self.retire_at is None else self.retire_at - FINAL_WEEK

    def next_due(self, sent_at: float) -> float:
        """When the user who was sent a notice at ``sent_at`` is due the next one."""
        due = sent_at + self.interval
        final_week = self.final_week_starts()
        if final_week is not None and sent_at < final_week < due:
            # The final week's notice comes however recent the last one was.
            due = final_week
        return due

    def is_due(self, now: float, due_at: float | None) -> bool:
        """Whether a user whose next notice is due at ``due_at`` (None: never sent) gets one."""
        return self.active(now) and (due_at is None or now >= due_at)

    def days_left(self, now: float) -> int | None:
        """Whole days until the retirement date, rounded up; None without a date."""
        if self.retire_at is None:
            return None
        return max(0, math.ceil((self.retire_at - now) / DAY))

    def date_text(self) -> str:
        """The retirement date as the notice says it: ``2027-03-01``, or "soon"."""
        if self.retire_at is None:
            return "soon"
        return datetime.fromtimestamp(self.retire_at, UTC).strftime("%Y-%m-%d")
