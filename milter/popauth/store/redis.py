"""A whitelist in Redis, shared by every POP and MTA host.

Each entry is one key, ``PREFIX + address``, whose value holds the user and
the login and expiry times, and which carries its own expiry (``SET ... EX``),
so Redis drops it on time for every host at once. A new login renews it.

There is no local cache: every lookup asks Redis, so a revoke on one host is
seen by the very next lookup on every other host (staleness bound: zero).
Every call has connect and read timeouts and is not retried; when Redis is
down or slow the caller gets :class:`StoreUnavailable` and fails closed
(tempfail at RCPT, ``ERR unavailable`` at ingest), and the next call simply
tries again, so both recover on their own.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import ClassVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from popauth.addresses import AddressError, IPAddress, parse_client_address
from popauth.clock import Clock
from popauth.store.base import Grant, GrantOutcome, StoreStats, StoreUnavailable, WhitelistStore

# RENEW in one step on the server: extend the key only while it exists and
# belongs to the user (never create it, so a revoke wins), with a new value
# and a new expiry. KEYS[1] the entry; ARGV user, new value, ttl.
_RENEW_SCRIPT = """
local raw = redis.call('GET', KEYS[1])
if not raw then return false end
local user = string.match(raw, '^[^ ]+ [^ ]+ (.*)$')
if user ~= ARGV[1] then return false end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1
"""


def _encode(grant: Grant) -> str:
    # The user goes last: it is the only field that may contain anything.
    return f"{grant.granted_at:.3f} {grant.expires_at:.3f} {grant.user}"


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _decode(address: IPAddress, raw: bytes | str) -> Grant | None:
    try:
        granted, expires, user = _text(raw).split(" ", 2)
        return Grant(address, user, float(granted), float(expires))
    except (UnicodeDecodeError, ValueError):
        return None  # not ours or damaged: never counts as whitelisted


class RedisStore(WhitelistStore):
    may_block: ClassVar[bool] = True

    def __init__(
        self, *, url: str, ttl: int, timeout: float, key_prefix: str, clock: Clock
    ) -> None:
        self._ttl = ttl
        self._prefix = key_prefix
        self._clock = clock
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        self._renew_script = self._client.register_script(_RENEW_SCRIPT)
        # Counters of this process only; Redis holds the shared entries.
        self._counts: Counter[str] = Counter()
        self._counts_lock = threading.Lock()

    @property
    def client(self) -> redis.Redis:
        """The connection, for state that lives next to the whitelist."""
        return self._client

    def _key(self, address: IPAddress) -> str:
        return f"{self._prefix}{address}"

    def _count(self, **increments: int) -> None:
        with self._counts_lock:
            self._counts.update(increments)

    def grant(self, address: IPAddress, user: str) -> GrantOutcome:
        now = self._clock.time()
        grant = Grant(address, user, now, now + self._ttl)
        try:
            previous = self._client.set(self._key(address), _encode(grant), ex=self._ttl, get=True)
        except redis.RedisError as error:
            raise StoreUnavailable(f"redis: {error}") from error
        renewed = previous is not None
        self._count(grants=1, renewals=int(renewed))
        return GrantOutcome(grant, renewed)

    def renew(self, address: IPAddress, user: str) -> Grant | None:
        now = self._clock.time()
        grant = Grant(address, user, now, now + self._ttl)
        try:
            renewed = self._renew_script(
                keys=[self._key(address)], args=[user, _encode(grant), self._ttl]
            )
        except redis.RedisError as error:
            raise StoreUnavailable(f"redis: {error}") from error
        return grant if renewed else None

    def lookup(self, address: IPAddress) -> Grant | None:
        try:
            raw = self._client.get(self._key(address))
        except redis.RedisError as error:
            raise StoreUnavailable(f"redis: {error}") from error
        grant = None if raw is None else _decode(address, raw)
        self._count(lookups=1, hits=int(grant is not None))
        return grant

    def revoke(self, address: IPAddress) -> Grant | None:
        try:
            raw = self._client.getdel(self._key(address))
        except redis.RedisError as error:
            raise StoreUnavailable(f"redis: {error}") from error
        grant = None if raw is None else _decode(address, raw)
        self._count(revocations=int(grant is not None))
        return grant

    def revoke_user(self, user: str) -> list[Grant]:
        removed = []
        for grant in self.entries():
            if grant.user == user:
                gone = self.revoke(grant.address)
                if gone is not None:
                    removed.append(gone)
        return removed

    def entries(self) -> list[Grant]:
        grants: list[Grant] = []
        try:
            keys = list(self._client.scan_iter(match=f"{self._prefix}*", count=1000))
            for start in range(0, len(keys), 1000):
                batch = keys[start : start + 1000]
                for key, raw in zip(batch, self._client.mget(batch), strict=True):
                    grant = self._entry(key, raw)
                    if grant is not None:
                        grants.append(grant)
        except redis.RedisError as error:
            raise StoreUnavailable(f"redis: {error}") from error
        return sorted(grants, key=lambda g: g.granted_at)

    def _entry(self, key: bytes | str, raw: bytes | str | None) -> Grant | None:
        if raw is None:  # expired between SCAN and MGET
            return None
        try:
            address = parse_client_address(_text(key)[len(self._prefix) :])
        except (UnicodeDecodeError, AddressError):
            return None
        return _decode(address, raw)

    def stats(self) -> StoreStats:
        entries = len(self.entries())
        with self._counts_lock:
            counts = dict(self._counts)
        return StoreStats(
            entries=entries,
            max_entries=0,  # bounded by Redis's maxmemory, not by popauth
            ttl=self._ttl,
            grants=counts.get("grants", 0),
            renewals=counts.get("renewals", 0),
            revocations=counts.get("revocations", 0),
            lookups=counts.get("lookups", 0),
            hits=counts.get("hits", 0),
            evictions=0,
        )

    def ping(self) -> bool:
        try:
            return bool(self._client.ping())
        except redis.RedisError:
            return False

    def close(self) -> None:
        self._client.close()
