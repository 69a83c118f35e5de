"""The embedded whitelist: a ``cachetools.TTLCache`` behind one lock.

libmilter calls back from one thread per SMTP connection and the ingest
endpoint runs in a thread of its own, while ``TTLCache`` is not thread-safe
(even a lookup reorders its LRU list), so every access holds the lock.

Only TTLCache's public interface is used (``get``, ``in``, item assignment,
``popitem``, ``expire``, iteration), so its internals may change between
releases without changing popauth.

Eviction rule, popauth's own: when the cache is full, a new login first
drops expired entries and then the entry *least recently used*, where a
login, a renewal and a lookup that found the entry (a message relayed) each
count as a use. That is TTLCache's documented ``popitem``. A client that is
busy sending keeps its place; the one that lost its place fails closed and
the caller logs it. A listing (snapshot, LIST, STATS) reads every entry; it
then re-reads them in login order, so that afterwards the least recently
used is the one that logged in first, on every cachetools release.

Recent ends, for ``popauth explain``: the store also remembers the last
entry of the most recent :data:`REMEMBERED_ENDS` addresses that logged in,
were revoked or were pushed out, and how each ended. TTLCache drops expired
entries without a word, so "expired at T" is read from the remembered entry
itself. Only logins, renewals and removals write it; a lookup (the milter's
per-message path) never touches it. It is not saved in the snapshot.

The block list is checked under the same lock as the write (``is_blocked``),
so a login and a block of the same user are ordered: see WhitelistStore.
"""

from __future__ import annotations

import ipaddress
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable

from cachetools import TTLCache

from popauth.addresses import IPAddress
from popauth.clock import Clock
from popauth.store.base import (
    EndedGrant,
    EndReason,
    Grant,
    GrantOutcome,
    StoreStats,
    UserBlocked,
    WhitelistStore,
)
from popauth.usernames import user_key

# IPv6 keys are tagged above bit 127 so that ::c000:201 never collides with
# 192.0.2.1; plain ints are far smaller than address objects or strings.
_IPV6_TAG = 1 << 128
_IPV6_MASK = _IPV6_TAG - 1

# How many addresses' last entries the store remembers for explanations
# (about 100 bytes each beyond the entry itself: docs/explain.rst).
REMEMBERED_ENDS = 10_000


def _key(address: IPAddress) -> int:
    if isinstance(address, ipaddress.IPv6Address):
        return int(address) | _IPV6_TAG
    return int(address)


def _address(key: int) -> IPAddress:
    if key & _IPV6_TAG:
        return ipaddress.IPv6Address(key & _IPV6_MASK)
    return ipaddress.IPv4Address(key)


class _Entry:
    """Who logged in, and the store-timer value at which the entry expires.

    TTLCache keeps its own expiry per key but does not publish it, so the
    entry carries it too (the bytes this costs are in docs/performance.rst).
    """

    __slots__ = ("expires", "user")

    def __init__(self, user: str, expires: float) -> None:
        self.user = user
        self.expires = expires


class _End:
    """An entry removed before it expired: why, and the store-timer value when."""

    __slots__ = ("at", "entry", "reason")

    def __init__(self, entry: _Entry, reason: EndReason, at: float) -> None:
        self.entry = entry
        self.reason = reason
        self.at = at


def _nobody_is_blocked(_: str) -> bool:
    return False


class MemoryStore(WhitelistStore):
    def __init__(
        self,
        *,
        ttl: int,
        max_entries: int,
        clock: Clock,
        is_blocked: Callable[[str], bool] = _nobody_is_blocked,
        remembered_ends: int = REMEMBERED_ENDS,
    ) -> None:
        self._ttl = ttl
        self._max_entries = max_entries
        self._clock = clock
        # The block list's membership test; it must not take this store's lock.
        self._is_blocked = is_blocked
        # Restoring a snapshot inserts entries as of their login time, so
        # that they keep their expiry; otherwise the shift is zero.
        self._timer_shift = 0.0
        self._cache: TTLCache[int, _Entry] = TTLCache(
            maxsize=max_entries, ttl=ttl, timer=self._timer
        )
        self._lock = threading.Lock()
        # Per address, its last entry (live or expired) or how it was removed.
        self._past: OrderedDict[int, _Entry | _End] = OrderedDict()
        self._remembered_ends = remembered_ends
        self._grants = 0
        self._renewals = 0
        self._revocations = 0
        self._lookups = 0
        self._hits = 0
        self._evictions = 0

    def _timer(self) -> float:
        return self._clock.monotonic() + self._timer_shift

    def _grant_of(self, address: IPAddress, entry: _Entry) -> Grant:
        # Wall-clock times are derived on the way out, so a clock step
        # changes what is displayed, never how long an entry lives.
        expires_at = entry.expires + self._clock.time() - self._clock.monotonic()
        return Grant(address, entry.user, expires_at - self._ttl, expires_at)

    def _live(self, key: int, now: float) -> _Entry | None:  # caller holds the lock
        """The entry of ``key`` if it is live at ``now``; a use of it (LRU)."""
        entry = self._cache.get(key)
        if entry is None or not now < entry.expires:
            return None
        return entry

    def _put(self, key: int, user: str, now: float) -> _Entry:  # caller holds the lock
        entry = _Entry(sys.intern(user), now + self._ttl)
        self._cache[key] = entry
        self._remember(key, entry)
        return entry

    def _remember(self, key: int, past: _Entry | _End) -> None:  # caller holds the lock
        remembered = self._past
        remembered[key] = past
        remembered.move_to_end(key)
        if len(remembered) > self._remembered_ends:
            remembered.popitem(last=False)

    def _wall(self, timer_value: float) -> float:
        return timer_value + self._clock.time() - self._clock.monotonic()

    def grant(self, address: IPAddress, user: str) -> GrantOutcome:
        key = _key(address)
        evicted: Grant | None = None
        with self._lock:
            if user and self._is_blocked(user):
                raise UserBlocked(user)
            cache = self._cache
            now = self._timer()
            renewed = self._live(key, now) is not None
            if not renewed and len(cache) >= self._max_entries:
                cache.expire()
                if len(cache) >= self._max_entries:
                    victim_key, victim = cache.popitem()  # the least recently used
                    evicted = self._grant_of(_address(victim_key), victim)
                    self._remember(victim_key, _End(victim, EndReason.EVICTED, now))
                    self._evictions += 1
            entry = self._put(key, user, now)
            self._grants += 1
            self._renewals += renewed
        return GrantOutcome(self._grant_of(address, entry), renewed, evicted)

    def renew(self, address: IPAddress, user: str) -> Grant | None:
        key = _key(address)
        with self._lock:
            if self._is_blocked(user):
                raise UserBlocked(user)
            # One reading of the timer for the check and the update: an
            # entry found expired is never brought back.
            now = self._timer()
            live = self._live(key, now)
            if live is None or live.user != user:
                return None
            entry = self._put(key, live.user, now)
        return self._grant_of(address, entry)

    def lookup(self, address: IPAddress) -> Grant | None:
        key = _key(address)
        with self._lock:
            self._lookups += 1
            entry = self._live(key, self._timer())
            if entry is None:
                return None
            self._hits += 1
        return self._grant_of(address, entry)

    def revoke(self, address: IPAddress) -> Grant | None:
        key = _key(address)
        with self._lock:
            now = self._timer()
            entry = self._live(key, now)
            if entry is None:
                return None
            del self._cache[key]
            self._remember(key, _End(entry, EndReason.REVOKED, now))
            self._revocations += 1
        return self._grant_of(address, entry)

    def revoke_user(self, user_name: str) -> list[Grant]:
        wanted = user_key(user_name)
        with self._lock:
            listing = self._listing()
            removed = [(key, entry) for key, entry in listing if user_key(entry.user) == wanted]
            now = self._timer()
            for key, entry in removed:
                del self._cache[key]
                self._remember(key, _End(entry, EndReason.REVOKED_WITH_USER, now))
            self._revocations += len(removed)
        return [self._grant_of(_address(key), entry) for key, entry in removed]

    def _listing(self) -> list[tuple[int, _Entry]]:  # caller holds the lock
        """(key, entry) of every live entry, oldest login first.

        Reading an entry is a use of it; reading them all once more in login
        order leaves the LRU order the login order, whatever order this
        cachetools release iterates in.
        """
        cache = self._cache
        now = self._timer()
        cache.expire()
        live = [(key, entry) for key in list(cache) if (entry := self._live(key, now))]
        live.sort(key=lambda pair: pair[1].expires)
        for key, _ in live:
            cache.get(key)
        return live

    def entries(self) -> list[Grant]:
        with self._lock:
            live = self._listing()
        return [self._grant_of(_address(key), entry) for key, entry in live]

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

    @property
    def ends_remembered(self) -> int:
        return self._remembered_ends

    def recent_end(self, address: IPAddress) -> EndedGrant | None:
        with self._lock:
            past = self._past.get(_key(address))
            now = self._timer()
            if isinstance(past, _End):
                ended = self._grant_of(address, past.entry)
                return EndedGrant(ended, past.reason, self._wall(past.at))
            if past is None or now < past.expires:
                return None  # never granted (or forgotten), or still live
            return EndedGrant(
                self._grant_of(address, past), EndReason.EXPIRED, self._wall(past.expires)
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
                    self._put(_key(grant.address), grant.user, self._timer())
                    restored += 1
            finally:
                self._timer_shift = 0.0
        return restored
