"""The embedded whitelist: a ``cachetools.TTLCache`` behind one lock.

libmilter calls back from one thread per SMTP connection and the ingest
endpoint runs in a thread of its own, while ``TTLCache`` is not thread-safe
(even a lookup reorders its LRU list), so every access holds the lock.

When the cache is full, a new login first drops expired entries and then the
least recently used entry (neither logged in nor looked up for longest). That
client loses relaying early, which fails closed; the caller logs it.
"""

from __future__ import annotations

import ipaddress
import sys
import threading
from collections.abc import Iterable

from cachetools import TTLCache

from popauth.addresses import IPAddress
from popauth.clock import Clock
from popauth.store.base import Grant, GrantOutcome, StoreStats, WhitelistStore

# IPv6 keys are tagged above bit 127 so that ::c000:201 never collides with
# 192.0.2.1; plain ints are far smaller than address objects or strings.
_IPV6_TAG = 1 << 128
_IPV6_MASK = _IPV6_TAG - 1

# (user, monotonic time of the login): a tuple is the smallest record here.
_Entry = tuple[str, float]


def _key(address: IPAddress) -> int:
    if isinstance(address, ipaddress.IPv6Address):
        return int(address) | _IPV6_TAG
    return int(address)


def _address(key: int) -> IPAddress:
    if key & _IPV6_TAG:
        return ipaddress.IPv6Address(key & _IPV6_MASK)
    return ipaddress.IPv4Address(key)


class MemoryStore(WhitelistStore):
    def __init__(self, *, ttl: int, max_entries: int, clock: Clock) -> None:
        self._ttl = ttl
        self._max_entries = max_entries
        self._clock = clock
        # Restoring a snapshot inserts entries as of their login time, so
        # that they keep their expiry; otherwise the shift is zero.
        self._timer_shift = 0.0
        self._cache: TTLCache[int, _Entry] = TTLCache(
            maxsize=max_entries, ttl=ttl, timer=self._timer
        )
        self._lock = threading.Lock()
        self._grants = 0
        self._renewals = 0
        self._revocations = 0
        self._lookups = 0
        self._hits = 0
        self._evictions = 0

    def _timer(self) -> float:
        return self._clock.monotonic() + self._timer_shift

    def _as_grant(self, key: int, entry: _Entry) -> Grant:
        user, granted_monotonic = entry
        # Wall-clock times are derived on the way out, so a clock step
        # changes what is displayed, never how long an entry lives.
        offset = self._clock.time() - self._clock.monotonic()
        granted_at = granted_monotonic + offset
        return Grant(_address(key), user, granted_at, granted_at + self._ttl)

    def grant(self, address: IPAddress, user: str) -> GrantOutcome:
        key = _key(address)
        entry = (sys.intern(user), self._clock.monotonic())
        evicted: Grant | None = None
        with self._lock:
            cache = self._cache
            renewed = key in cache
            if not renewed and len(cache) >= self._max_entries:
                cache.expire()
                if len(cache) >= self._max_entries:
                    victim_key, victim = cache.popitem()
                    evicted = self._as_grant(victim_key, victim)
                    self._evictions += 1
            cache[key] = entry
            self._grants += 1
            self._renewals += renewed
        return GrantOutcome(self._as_grant(key, entry), renewed, evicted)

    def lookup(self, address: IPAddress) -> Grant | None:
        key = _key(address)
        with self._lock:
            self._lookups += 1
            entry = self._cache.get(key)
            if entry is None:
                return None
            self._hits += 1
        return self._as_grant(key, entry)

    def revoke(self, address: IPAddress) -> Grant | None:
        key = _key(address)
        with self._lock:
            entry = self._cache.get(key)
            if entry is None:
                return None
            del self._cache[key]
            self._revocations += 1
        return self._as_grant(key, entry)

    def revoke_user(self, user: str) -> list[Grant]:
        with self._lock:
            self._cache.expire()
            doomed = [(key, self._cache[key]) for key in list(self._cache)]
            doomed = [(key, entry) for key, entry in doomed if entry[0] == user]
            for key, _ in doomed:
                del self._cache[key]
            self._revocations += len(doomed)
        return [self._as_grant(key, entry) for key, entry in doomed]

    def entries(self) -> list[Grant]:
        with self._lock:
            self._cache.expire()
            # Iterating a TTLCache walks its expiry list: oldest login first.
            live = [(key, self._cache[key]) for key in self._cache]
        return [self._as_grant(key, entry) for key, entry in live]

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
        now_monotonic = self._clock.monotonic()
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
                    granted_monotonic = now_monotonic + self._timer_shift
                    self._cache[_key(grant.address)] = (sys.intern(grant.user), granted_monotonic)
                    restored += 1
            finally:
                self._timer_shift = 0.0
        return restored
