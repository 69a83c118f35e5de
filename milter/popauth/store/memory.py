"""The embedded whitelist: a ``cachetools.TTLCache`` behind one lock.

libmilter calls back from one thread per SMTP connection and the ingest
endpoint runs in a thread of its own, while ``TTLCache`` is not thread-safe
(even a lookup reorders its LRU list), so every access holds the lock.

Only TTLCache's public interface is used (``get``, ``pop``, item
assignment, ``popitem``, ``expire``, ``len``), so its internals may change
between releases without changing popauth.

Eviction rule, popauth's own: when the cache is full, a new login first
drops expired entries and then the entry *least recently used*, where a
login, a renewal and a lookup that found the entry (a message relayed) each
count as a use, and nothing else does: a listing (snapshot, LIST, STATS,
REVOKEUSER) is not a use. That is TTLCache's documented ``popitem``. A
client that is busy sending keeps its place; the one that lost its place
fails closed and the caller logs it.

No lookup or login waits behind work that grows with the whitelist. Each
entry is also a link of popauth's own list of the entries in login order
(which, with one TTL for all, is also their expiry order). So:

- a listing or a revocation of a user walks that list in chunks of
  :data:`popauth.store.pacing.CHUNK` entries, holding the lock for one chunk at a
  time and letting other threads run between chunks (``popauth.store.pacing``),
  and never reads the cache, so it is not a use;
- every operation first drops the entries that have expired since the last
  one, oldest first, from the cache and the list alike. The cache is never
  left to find a pile of them at once, and the store's timer stands still
  during an operation, so the cache and the list always agree on what has
  expired.

A listing is weakly consistent, as a walk that lets others in between its
steps must be: every entry live from its start to its end is listed once;
one written while it went on is listed with its newest login; one removed
while it went on may or may not be.

Recent ends, for ``popauth explain``: the store also remembers the last
entry of the most recent :data:`REMEMBERED_ENDS` addresses that logged in,
were revoked or were pushed out, and how each ended. "Expired at T" is read
from the remembered entry itself. Only logins, renewals and removals write
it; a lookup (the milter's per-message path) never touches it. It is not
saved in the snapshot.

Several users behind one address: each member of an entry is an entry of
the list in login order of its own, so each expires on its own time. The
cache holds, per address, its newest member, whose expiry is the latest
(one TTL for all), so the cache drops the address when its last member
expires. An address with more than one member is also in a plain dict,
its members oldest first; an address of one user (the common case) costs
nothing more than before. When an address holds ``max_users_per_address``
members, a login of another user pushes out the oldest: the one that
expires soonest.

The block list is checked under the same lock as the write (``is_blocked``),
so a login and a block of the same user are ordered: see WhitelistStore.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator

from cachetools import TTLCache

from popauth.basics.addresses import IPAddress
from popauth.basics.clock import Clock
from popauth.basics.usernames import user_key
from popauth.store.base import (
    MAX_USERS_PER_ADDRESS,
    BudgetSpend,
    BudgetUse,
    EndedGrant,
    EndReason,
    Entry,
    Grant,
    GrantOutcome,
    StoreStats,
    UserBlocked,
    WhitelistStore,
)
from popauth.store.budgets import RelayBudgets
from popauth.store.pacing import CHUNK, let_others_run

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


# The key of the list's root and of the bookmarks of walks under way.
_MARK = -1


class _Entry(float):
    """One member of a whitelist entry: its expiry on the store's timer, as the float itself.

    TTLCache keeps its own expiry per key but does not publish it, so the
    entry carries it too. Being that float (rather than an object holding
    one) saves 24 bytes per entry. It also carries who logged in, its key,
    and its neighbours in popauth's list of entries in login order. An
    entry never changes once written; a renewal writes a new one.
    """

    __slots__ = ("key", "newer", "older", "user")

    key: int
    user: str
    # Toward the oldest and the newest login; the list's root links its ends.
    older: _Entry
    newer: _Entry

    @property
    def expires(self) -> float:
        return float(self)


def _mark() -> _Entry:
    """A root or a bookmark: no entry, never expires, linked to itself."""
    mark = _Entry(math.inf)
    mark.key, mark.user = _MARK, ""
    mark.older = mark.newer = mark
    return mark


def _link_before(entry: _Entry, successor: _Entry) -> None:
    entry.newer = successor
    entry.older = older = successor.older
    older.newer = successor.older = entry


class _End:
    """An entry removed before it expired: why, and the store-timer value when."""

    __slots__ = ("at", "entry", "reason")

    def __init__(self, entry: _Entry, reason: EndReason, at: float) -> None:
        self.entry = entry
        self.reason = reason
        self.at = at


def _nobody_is_blocked(_: str) -> bool:
    return False


# Grant and Entry are named tuples, made on every lookup: made straight from
# their fields, skipping the generated __new__, they cost half as much.
_make = tuple.__new__


def _remove(members: list[_Entry], member: _Entry) -> None:
    # By identity: entries are floats, and two members may expire at once.
    for index, candidate in enumerate(members):
        if candidate is member:
            del members[index]
            return


Visit = Callable[[_Entry, bool], None]


class MemoryStore(WhitelistStore):
    def __init__(
        self,
        *,
        ttl: int,
        max_entries: int,
        clock: Clock,
        is_blocked: Callable[[str], bool] = _nobody_is_blocked,
        remembered_ends: int = REMEMBERED_ENDS,
        max_users_per_address: int = MAX_USERS_PER_ADDRESS,
    ) -> None:
        self._ttl = ttl
        self._max_entries = max_entries
        self._max_users = max_users_per_address
        self._clock = clock
        # The block list's membership test; it must not take this store's lock.
        self._is_blocked = is_blocked
        # The store's timer: set once at the start of every operation (under
        # the lock), so the cache sees one instant throughout it. Restoring
        # a snapshot sets it back, so that entries keep their expiry.
        self._now = clock.monotonic()
        self._cache: TTLCache[int, _Entry] = TTLCache(
            maxsize=max_entries, ttl=ttl, timer=self._timer
        )
        # Per address of more than one member, its members oldest first (the
        # last is the one in the cache). Addresses of one member are not here.
        self._shared: dict[int, list[_Entry]] = {}
        # Every member of every entry, oldest login first, and bookmarks.
        self._root = _mark()
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
        # The relay budgets, under a lock of their own (popauth.store.budgets).
        self._budgets = RelayBudgets(clock=clock, max_windows=max_entries)

    def _timer(self) -> float:
        return self._now

    # --- the list in login order (caller holds the lock) -------------------

    def _start(self) -> float:
        """Begin an operation: fix the timer and drop what has expired since."""
        self._now = now = self._clock.monotonic()
        oldest = self._root.newer
        if not now < oldest or (oldest.key == _MARK and oldest is not self._root):
            self._expire(now)
        return now

    def _expire(self, now: float) -> None:
        # What has expired since the last operation: the logins of as long a
        # span, a TTL earlier. Operations come many a second on a busy host,
        # so this is a handful; only a store left idle for a whole TTL after
        # a burst of logins pays for that burst here, once.
        self._cache.expire(now)
        root = self._root
        entry = root.newer
        while entry is not root:
            following = entry.newer
            if entry.key != _MARK:
                if now < entry:
                    return
                if self._leave(entry):
                    # Its address's last member: the cache has dropped it
                    # already, unless a revoke moved its place (_leave).
                    with contextlib.suppress(KeyError):
                        del self._cache[entry.key]
            entry = following

    def _unlink(self, entry: _Entry) -> None:
        entry.older.newer = entry.newer
        entry.newer.older = entry.older
        # A removed entry may be remembered (recent ends): it must not keep
        # its old neighbours, and theirs, alive.
        entry.older = entry.newer = self._root

    def _members(self, key: int, newest: _Entry) -> list[_Entry]:
        """The members of the address whose newest member is ``newest``, oldest first."""
        return self._shared.get(key) or [newest]

    def _put(
        self, key: int, user: str, now: float, newest: _Entry | None
    ) -> tuple[_Entry, _Entry | None, _Entry | None]:
        """Write ``user``'s membership of ``key``, whose newest member is ``newest``.

        Returns the new member, the member it replaced (the user's own) and
        the one it pushed out to stay within the bound per address.
        """
        entry = _Entry(now + self._ttl)
        entry.key, entry.user = key, sys.intern(user)
        self._cache[key] = entry
        _link_before(entry, self._root)
        self._remember(key, entry)
        if newest is None:
            return entry, None, None
        members = self._members(key, newest)
        replaced = next((member for member in members if member.user == user), None)
        displaced = None
        if replaced is not None:
            _remove(members, replaced)
            self._unlink(replaced)
        elif len(members) >= self._max_users:
            displaced = members.pop(0)  # the oldest login expires soonest
            self._unlink(displaced)
        members.append(entry)
        if len(members) > 1:
            self._shared[key] = members
        else:
            self._shared.pop(key, None)
        return entry, replaced, displaced

    def _leave(self, member: _Entry) -> bool:
        """Take ``member`` out of the list and of its address's members.

        True when it was the address's last member (the caller removes the
        address from the cache). When it was the newest of several, the
        next newest takes its place in the cache, with its own expiry: the
        store's timer is set back for that write, as a restore does.
        """
        self._unlink(member)
        key = member.key
        members = self._shared.get(key)
        if members is None:
            return True
        newest = members[-1]
        _remove(members, member)
        if member is newest:
            now = self._now
            self._now = float(members[-1]) - self._ttl
            self._cache[key] = members[-1]
            self._now = now
            self._remember(key, members[-1])
        if len(members) == 1:
            del self._shared[key]
        return False

    def _drop_address(self, key: int, newest: _Entry) -> list[_Entry]:
        """Unlink every member of an address already taken out of the cache."""
        members = self._shared.pop(key, None) or [newest]
        for member in members:
            self._unlink(member)
        return members

    def _remember(self, key: int, past: _Entry | _End) -> None:
        remembered = self._past
        remembered[key] = past
        remembered.move_to_end(key)
        if len(remembered) > self._remembered_ends:
            remembered.popitem(last=False)

    def _walk(self, visit: Visit) -> None:
        """``visit(entry, late)`` for every entry, oldest first, a chunk per lock hold.

        ``late`` tells an entry written after the walk began; the walk goes
        on to the newest end as it is when it ends, so every entry written
        meanwhile is visited too, after its write. Between chunks the lock
        is released and other threads run; a bookmark in the list keeps the
        place, and entries removed meanwhile are simply not there.
        """
        root = self._root
        bookmark, end = _mark(), _mark()
        with self._lock:
            self._start()
            _link_before(bookmark, root.newer)
            _link_before(end, root)
        late = False
        try:
            while bookmark.newer is not root:
                with self._lock:
                    self._start()
                    entry = bookmark.newer
                    budget = CHUNK
                    while entry is not root and budget:
                        following = entry.newer
                        if entry is end:
                            late = True
                        elif entry.key != _MARK:
                            visit(entry, late)
                            budget -= 1
                        entry = following
                    # The place to go on from: before the first entry not visited.
                    self._unlink(bookmark)
                    _link_before(bookmark, entry)
                let_others_run()
        finally:
            with self._lock:
                self._unlink(end)
                self._unlink(bookmark)

    def _grant_of(self, address: IPAddress, entry: _Entry) -> Grant:
        # Wall-clock times are derived on the way out, so a clock step
        # changes what is displayed, never how long an entry lives.
        expires_at = float(entry) + self._clock.time() - self._clock.monotonic()
        return _make(Grant, (address, entry.user, expires_at - self._ttl, expires_at))

    def _entry_of(self, address: IPAddress, members: list[_Entry]) -> Entry:
        return _make(Entry, (address, tuple([self._grant_of(address, m) for m in members])))

    def _grant_chunks(self, entries: list[_Entry]) -> Iterator[list[Grant]]:
        """The grants of ``entries``, a chunk at a time, made only when asked.

        Outside the lock, letting other threads in after each chunk. A
        consumer that drops each chunk when done (a snapshot) keeps few
        objects alive at a time: a million grants alive at once would
        survive into the collector's oldest generation and bring on a full
        collection, which walks every object the whitelist holds while
        every other thread waits.
        """
        shift = self._clock.time() - self._clock.monotonic()
        ttl = self._ttl
        for start in range(0, len(entries), CHUNK):
            chunk = []
            for entry in entries[start : start + CHUNK]:
                expires_at = float(entry) + shift
                chunk.append(Grant(_address(entry.key), entry.user, expires_at - ttl, expires_at))
            yield chunk
            let_others_run()

    def _wall(self, timer_value: float) -> float:
        return timer_value + self._clock.time() - self._clock.monotonic()

    # --- the store ---------------------------------------------------------

    def grant(self, address: IPAddress, user: str) -> GrantOutcome:
        key = _key(address)
        evicted: Entry | None = None
        with self._lock:
            if user and self._is_blocked(user):
                raise UserBlocked(user)
            cache = self._cache
            now = self._start()
            newest = cache.get(key)  # a use (LRU); expired entries are gone
            if newest is None and len(cache) >= self._max_entries:
                victim_key, victim = cache.popitem()  # the least recently used
                victims = self._drop_address(victim_key, victim)
                evicted = self._entry_of(_address(victim_key), victims)
                self._remember(victim_key, _End(victim, EndReason.EVICTED, now))
                self._evictions += 1
            entry, replaced, displaced = self._put(key, user, now, newest)
            self._grants += 1
            self._renewals += replaced is not None
        return GrantOutcome(
            self._grant_of(address, entry),
            replaced is not None,
            evicted,
            None if displaced is None else self._grant_of(address, displaced),
        )

    def renew(self, address: IPAddress, user: str) -> Grant | None:
        key = _key(address)
        with self._lock:
            if self._is_blocked(user):
                raise UserBlocked(user)
            # One reading of the timer for the check and the update: an
            # entry found expired is never brought back.
            now = self._start()
            newest = self._cache.get(key)
            if newest is None or not any(m.user == user for m in self._members(key, newest)):
                return None
            entry, _, _ = self._put(key, user, now, newest)
        return self._grant_of(address, entry)

    def lookup(self, address: IPAddress) -> Entry | None:
        key = _key(address)
        with self._lock:
            self._lookups += 1
            self._start()
            newest = self._cache.get(key)
            if newest is None:
                return None
            self._hits += 1
            shared = self._shared.get(key)
            if shared is not None:
                return self._entry_of(address, shared)
        return _make(Entry, (address, (self._grant_of(address, newest),)))

    def revoke(self, address: IPAddress) -> Entry | None:
        key = _key(address)
        with self._lock:
            now = self._start()
            newest = self._cache.pop(key, None)
            if newest is None:
                return None
            members = self._drop_address(key, newest)
            self._remember(key, _End(newest, EndReason.REVOKED, now))
            self._revocations += 1
        return self._entry_of(address, members)

    def revoke_user(self, user_name: str) -> list[Grant]:
        """Remove every membership of the user, a chunk at a time.

        Atomic for that user's logins all the same: the walk goes on to the
        newest end as it is when the walk ends, so a membership of the user
        written while it went on is removed too. A BLOCK adds the user to
        the block list first, so no such membership can be written at all.
        """
        wanted = user_key(user_name)
        matches: dict[str, bool] = {}  # per distinct name: casefolding costs
        removed: list[_Entry] = []

        def visit(entry: _Entry, _: bool) -> None:
            name = entry.user
            matching = matches.get(name)
            if matching is None:
                matching = matches[name] = user_key(name) == wanted
            if matching:
                if self._leave(entry):
                    del self._cache[entry.key]
                    self._remember(entry.key, _End(entry, EndReason.REVOKED_WITH_USER, self._now))
                self._revocations += 1
                removed.append(entry)

        self._walk(visit)
        return [grant for chunk in self._grant_chunks(removed) for grant in chunk]

    def entries(self) -> list[Grant]:
        return [grant for chunk in self.entry_chunks() for grant in chunk]

    def entry_chunks(self) -> Iterator[list[Grant]]:
        listed: list[_Entry] = []
        # Written while the walk went on: by member, the newest write last.
        rewritten: dict[tuple[int, str], _Entry] = {}

        def visit(entry: _Entry, late: bool) -> None:
            if late:
                member = (entry.key, entry.user)
                rewritten.pop(member, None)
                rewritten[member] = entry
            else:
                listed.append(entry)

        self._walk(visit)
        if rewritten:
            listed = [entry for entry in listed if (entry.key, entry.user) not in rewritten]
            listed += rewritten.values()
        return self._grant_chunks(listed)

    def stats(self) -> StoreStats:
        with self._lock:
            self._start()
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

    def spend_budget(self, address: IPAddress, limit: int, window: float) -> BudgetSpend:
        return self._budgets.spend(address, limit, window)

    def budget_use(self, address: IPAddress) -> BudgetUse:
        return self._budgets.use(address)

    @property
    def ends_remembered(self) -> int:
        return self._remembered_ends

    def recent_end(self, address: IPAddress) -> EndedGrant | None:
        with self._lock:
            past = self._past.get(_key(address))
            now = self._clock.monotonic()
            if isinstance(past, _End):
                ended = self._grant_of(address, past.entry)
                return EndedGrant(ended, past.reason, self._wall(past.at))
            if past is None or now < past:
                return None  # never granted (or forgotten), or still live
            return EndedGrant(self._grant_of(address, past), EndReason.EXPIRED, self._wall(past))

    def restore(self, grants: Iterable[Grant]) -> int:
        """Re-insert saved memberships with their remaining time; returns how many.

        Expired ones are dropped, and so are those of users on the block
        list now (fail closed: a block made after the snapshot still holds).
        Several memberships of one address make one entry of several users.
        Only for an empty store at start: the cache and the list keep their
        expiry order by inserting oldest first.
        """
        restored = 0
        with self._lock:
            now_wall = self._clock.time()
            now = self._start()
            for grant in sorted(grants, key=lambda g: g.expires_at):
                # A snapshot never outlives the TTL now in force.
                remaining = min(grant.expires_at - now_wall, self._ttl)
                if remaining <= 0 or (grant.user and self._is_blocked(grant.user)):
                    continue
                key = _key(grant.address)
                newest = self._cache.get(key)
                if newest is None and len(self._cache) >= self._max_entries:
                    continue
                # Inserted "ttl - remaining" seconds ago, it expires on time.
                self._now = shifted = now + remaining - self._ttl
                self._put(key, grant.user, shifted, newest)
                restored += 1
            self._now = now
        return restored
