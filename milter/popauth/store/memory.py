"""The embedded whitelist: a ``cachetools.TTLCache`` behind one lock.

libmilter calls back from one thread per SMTP connection and the ingest
endpoint runs in a thread of its own, while ``TTLCache`` is not thread-safe
(even a lookup reorders its LRU list), so every access holds the lock.

When the cache is full, a new login first drops expired entries and then the
entry of the oldest login (the one nearest to expiry). That client loses
relaying early, which fails closed; the caller logs it.
"""

from __future__ import annotations

import ipaddress
import sys
import threading
from collections.abc import Iterable
from typing import Any

from cachetools import Cache, TTLCache

from popauth.addresses import IPAddress
from popauth.clock import Clock
from popauth.store.base import Grant, GrantOutcome, StoreStats, WhitelistStore

# IPv6 keys are tagged above bit 127 so that ::c000:201 never collides with
# 192.0.2.1; plain ints are far smaller than address objects or strings.
_IPV6_TAG = 1 << 128
_IPV6_MASK = _IPV6_TAG - 1


def _key(address: IPAddress) -> int:
    if isinstance(address, ipaddress.IPv6Address):
        return int(address) | _IPV6_TAG
    return int(address)


def _address(key: int) -> IPAddress:
    if key & _IPV6_TAG:
        return ipaddress.IPv6Address(key & _IPV6_MASK)
    return ipaddress.IPv4Address(key)


class _Whitelist(TTLCache[int, str]):
    """A TTLCache whose values are just the (interned) user names.

    The login time is not stored a second time: with one TTL for every
    entry it is the expiry that TTLCache keeps for each key anyway, minus
    the TTL. That makes an entry about 280 bytes instead of 370.
    """

    def expiry(self, key: int) -> float:
        """The timer value at which ``key`` expires (KeyError if absent)."""
        # TTLCache's per-key link; pinned by a unit test of this class.
        links: dict[int, Any] = self._TTLCache__links  # type: ignore[attr-defined]
        return float(links[key].expires)

    def peek(self, key: int) -> tuple[str, float] | None:
        """(user, expiry) of ``key`` if live, without refreshing its LRU position.

        Lookups happen at every message; reordering the LRU list on each
        costs time at scale, and the eviction order it would give (least
        recently used) is no better for a whitelist than the oldest login.
        """
        link = self._TTLCache__links.get(key)  # type: ignore[attr-defined]
        if link is None or not self.timer() < link.expires:
            return None
        user: str = Cache.__getitem__(self, key)
        return user, float(link.expires)


class MemoryStore(WhitelistStore):
    def __init__(self, *, ttl: int, max_entries: int, clock: Clock) -> None:
        self._ttl = ttl
        self._max_entries = max_entries
        self._clock = clock
        # Restoring a snapshot inserts entries as of their login time, so
        # that they keep their expiry; otherwise the shift is zero.
        self._timer_shift = 0.0
        self._cache = _Whitelist(maxsize=max_entries, ttl=ttl, timer=self._timer)
        self._lock = threading.Lock()
        self._grants = 0
        self._renewals = 0
        self._revocations = 0
        self._lookups = 0
        self._hits = 0
        self._evictions = 0

    def _timer(self) -> float:
        return self._clock.monotonic() + self._timer_shift

    def _grant_of(self, address: IPAddress, user: str, expires: float) -> Grant:
        # Wall-clock times are derived on the way out, so a clock step
        # changes what is displayed, never how long an entry lives.
        expires_at = expires + self._clock.time() - self._clock.monotonic()
        return Grant(address, user, expires_at - self._ttl, expires_at)

    def grant(self, address: IPAddress, user: str) -> GrantOutcome:
        key = _key(address)
        user = sys.intern(user)
        evicted: Grant | None = None
        with self._lock:
            cache = self._cache
            renewed = key in cache
            if not renewed and len(cache) >= self._max_entries:
                cache.expire()
                if len(cache) >= self._max_entries:
                    victim_key = next(iter(cache))  # the oldest login
                    victim_user, victim_expires = cache.peek(victim_key) or ("", 0.0)
                    evicted = self._grant_of(_address(victim_key), victim_user, victim_expires)
                    del cache[victim_key]
                    self._evictions += 1
            cache[key] = user
            expires = cache.expiry(key)
            self._grants += 1
            self._renewals += renewed
        return GrantOutcome(self._grant_of(address, user, expires), renewed, evicted)

    def renew(self, address: IPAddress, user: str) -> Grant | None:
        key = _key(address)
        # The frozen timer makes the check and the update one instant: an
        # entry that expires in between must not come back.
        with self._lock, self._cache.timer:
            live = self._cache.peek(key)
            if live is None or live[0] != user:
                return None
            # Setting the key again restarts its TTL and moves it to the
            # young end of the expiry order, like a login does.
            self._cache[key] = live[0]
            expires = self._cache.expiry(key)
        return self._grant_of(address, live[0], expires)

    def lookup(self, address: IPAddress) -> Grant | None:
        key = _key(address)
        with self._lock:
            self._lookups += 1
            live = self._cache.peek(key)
            if live is None:
                return None
            self._hits += 1
        return self._grant_of(address, *live)

    def revoke(self, address: IPAddress) -> Grant | None:
        key = _key(address)
        with self._lock:
            live = self._cache.peek(key)
            if live is None:
                return None
            del self._cache[key]
            self._revocations += 1
        return self._grant_of(address, *live)

    def revoke_user(self, user_name: str) -> list[Grant]:
        with self._lock:
            removed = [
                (key, user, expires) for key, user, expires in self._live() if user == user_name
            ]
            for key, _, _ in removed:
                del self._cache[key]
            self._revocations += len(removed)
        return [self._grant_of(_address(key), user, expires) for key, user, expires in removed]

    def _live(self) -> list[tuple[int, str, float]]:  # caller holds the lock
        """(key, user, expiry) of every live entry, oldest login first."""
        self._cache.expire()
        # Iterating a TTLCache walks its expiry list: oldest login first.
        live = []
        for key in self._cache:
            found = self._cache.peek(key)
            if found is not None:
                live.append((key, *found))
        return live

    def entries(self) -> list[Grant]:
        with self._lock:
            live = self._live()
        return [self._grant_of(_address(key), user, expires) for key, user, expires in live]

    def stats(self) -> StoreStats:
        with self._lock:
            self._cache.expire()
            return StoreStats(
                entries=len(self._cache),
                max_entries=self._max_entries,
                ttl=self._ttl,
                grants=self._grants,
                renewals=self._renewals,
                revocations=self._revocations,
                lookups=self._lookups,
                hits=self._hits,
                evictions=self._evictions,
            )

    def restore(self, grants: Iterable[Grant]) -> int:
        """Re-insert saved entries with their remaining time; returns how many.

        Expired entries are dropped. Only for an empty store at start: the
        cache keeps its expiry list ordered by inserting oldest first.
        """
        now_wall = self._clock.time()
        restored = 0
        with self._lock:
            try:
                for grant in sorted(grants, key=lambda g: g.expires_at):
                    # A snapshot never outlives the TTL now in force.
                    remaining = min(grant.expires_at - now_wall, self._ttl)
                    if remaining <= 0 or len(self._cache) >= self._max_entries:
                        continue
                    # Inserted "ttl - remaining" seconds ago, it expires on time.
                    self._timer_shift = remaining - self._ttl
                    self._cache[_key(grant.address)] = sys.intern(grant.user)
                    restored += 1
            finally:
                self._timer_shift = 0.0
        return restored
