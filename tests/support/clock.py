from __future__ import annotations


class FakeClock:
    """A clock that moves only when told to; wall and monotonic time together."""

    def __init__(self, wall: float = 1_800_000_000.0) -> None:
        self._monotonic = 1000.0
        self._offset = wall - self._monotonic

    def monotonic(self) -> float:
        return self._monotonic

    def time(self) -> float:
        return self._monotonic + self._offset

    def advance(self, seconds: float) -> None:
        self._monotonic += seconds
