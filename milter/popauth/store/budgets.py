"""The relay budgets of the embedded store: one window per address, behind one lock.

A window opens with the first recipient counted for an address and ends
``window`` seconds later, on the store's monotonic clock. Windows are kept
in the order they opened, which with one window length for all is also the
order they end, so every call first drops the windows that have ended,
oldest first: a handful at a time, never a pile. A budget outlives no
window, whether or not its address is still whitelisted.

The number of open windows is bounded too (``max_windows``, the
whitelist's ``max_entries``): a budget is only spent after a lookup found
the address whitelisted, so that many are open only after as many
addresses relayed within one window. Past the bound, the window that ends
soonest makes room, as the least recently used entry does in the whitelist.

Not saved in the snapshot: a restart opens every window anew.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from popauth.basics.addresses import IPAddress
from popauth.basics.clock import Clock
from popauth.store.base import BudgetSpend, BudgetUse


class _Window:
    __slots__ = ("ends", "used", "warned")

    def __init__(self, ends: float) -> None:
        self.ends = ends
        self.used = 0
        self.warned = False


class RelayBudgets:
    def __init__(self, *, clock: Clock, max_windows: int) -> None:
        self._clock = clock
        self._max_windows = max_windows
        self._windows: OrderedDict[IPAddress, _Window] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            self._expire(self._clock.monotonic())
            return len(self._windows)

    def _expire(self, now: float) -> None:
        windows = self._windows
        while windows:
            oldest = next(iter(windows.values()))
            if now < oldest.ends:
                return
            windows.popitem(last=False)

    def _open(self, address: IPAddress, now: float) -> _Window | None:
        """The window open for ``address`` now, if any (caller holds the lock)."""
        self._expire(now)
        window = self._windows.get(address)
        # A window may outlast a shorter one opened after it (a reload
        # changed the length): the sweep stops at it, so check each too.
        if window is not None and now >= window.ends:
            del self._windows[address]
            return None
        return window

    def spend(self, address: IPAddress, limit: int, window_seconds: float) -> BudgetSpend:
        with self._lock:
            now = self._clock.monotonic()
            window = self._open(address, now)
            if window is None:
                if len(self._windows) >= self._max_windows:
                    self._windows.popitem(last=False)
                window = self._windows[address] = _Window(now + window_seconds)
            if window.used < limit:
                window.used += 1
                return BudgetSpend(True, limit - window.used, False)
            first = not window.warned
            window.warned = True
            return BudgetSpend(False, 0, first)

    def use(self, address: IPAddress) -> BudgetUse:
        with self._lock:
            now = self._clock.monotonic()
            window = self._open(address, now)
            if window is None:
                return BudgetUse(0, None)
            return BudgetUse(window.used, window.ends - now + self._clock.time())
