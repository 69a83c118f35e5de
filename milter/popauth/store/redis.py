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

With Redis Sentinel (:func:`connect`, ``sentinels``) the client asks the
sentinels for the current master on every new connection. A connection to a
dead or demoted master fails like any outage (fail closed, tempfail), the
connection is dropped, and the next call asks the sentinels again: popauth
follows a failover without a restart.

Replication is asynchronous, so a login written to the master just before it
dies may be missing on the replica that takes over. ``wait_replicas`` makes a
grant wait (``WAIT``) until that many replicas hold it before it is
acknowledged; a grant they do not confirm in time is undone and refused.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.connection import SSLConnection, parse_url
from redis.retry import Retry
from redis.sentinel import Sentinel

from popauth.addresses import AddressError, IPAddress, parse_stored_key
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


@dataclass(frozen=True)
class SentinelSettings:
    """Where the sentinels are, which master to ask for, and how to talk to them.

    The credentials and TLS here are the sentinels' own; the master's come
    from the Redis URL.
    """

    addresses: tuple[tuple[str, int], ...]
    service: str
    username: str = ""
    password: str = ""
    tls: bool = False
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""

    def connection_options(self, timeout: float) -> dict[str, Any]:
        options: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),
        }
        if self.username:
            options["username"] = self.username
        if self.password:
            options["password"] = self.password
        if self.tls:
            options["ssl"] = True
            options["ssl_ca_certs"] = self.tls_ca_file or None
            options["ssl_certfile"] = self.tls_cert_file or None
            options["ssl_keyfile"] = self.tls_key_file or None
        return options


def _no_retries(timeout: float) -> dict[str, Any]:
    return {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
    }


def unix_connections_take_a_connect_timeout() -> bool:
    """Whether this redis-py's UNIX socket connections accept ``socket_connect_timeout``.

    redis-py 4.3 (Debian 12's) refuses the keyword and connects a UNIX socket
    within ``socket_timeout``; later releases default the connect timeout to
    their own constant instead (5 s in redis-py 8), so they must be given it.
    Asked of the public class itself: building a connection does not connect.
    """
    # Any: the releases' type hints differ (8.x calls the class abstract).
    connection_class: Any = redis.UnixDomainSocketConnection
    try:
        connection_class(socket_connect_timeout=1.0)
    except TypeError:
        return False
    return True


def _direct_options(url: str, timeout: float) -> dict[str, Any]:
    """The client options for ``url`` itself, without sentinels."""
    options = _no_retries(timeout)
    if urlsplit(url).scheme == "unix" and not unix_connections_take_a_connect_timeout():
        del options["socket_connect_timeout"]  # socket_timeout bounds the connect
    return options


def connect(url: str, timeout: float, sentinel: SentinelSettings | None = None) -> redis.Redis:
    """A client for ``url``, or for the master the sentinels name.

    With sentinels, ``url`` still gives the master's password, database and
    TLS (``rediss://``); its host and port are replaced by the sentinels' answer.
    """
    if sentinel is None:
        return redis.Redis.from_url(url, **_direct_options(url, timeout))
    parsed: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
    master_options = {
        key: value
        for key, value in parsed.items()
        if key not in ("host", "port", "path", "connection_class")
    }
    if parsed.get("connection_class") is SSLConnection:
        master_options["ssl"] = True  # the sentinel pool picks its TLS connection class
    manager = Sentinel(
        list(sentinel.addresses),
        sentinel_kwargs=sentinel.connection_options(timeout),
        **_no_retries(timeout),
        **master_options,
    )
    client: redis.Redis = manager.master_for(sentinel.service)
    return client


class RedisStore(WhitelistStore):
    may_block: ClassVar[bool] = True

    def __init__(
        self,
        *,
        client: redis.Redis,
        ttl: int,
        key_prefix: str,
        clock: Clock,
        wait_replicas: int = 0,
        wait_timeout: float = 0.1,
    ) -> None:
        self._ttl = ttl
        self._prefix = key_prefix
        self._clock = clock
        self._client = client
        self._renew_script = self._client.register_script(_RENEW_SCRIPT)
        self._wait_replicas = wait_replicas
        self._wait_milliseconds = max(1, round(wait_timeout * 1000))
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
        key = self._key(address)
        previous: Any
        try:
            if self._wait_replicas:
                previous = self._set_on_replicas(address, key, _encode(grant))
            else:
                previous = self._client.set(key, _encode(grant), ex=self._ttl, get=True)
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

    def _set_on_replicas(self, address: IPAddress, key: str, value: str) -> bytes | str | None:
        """SET, then WAIT on the same connection (one round trip for both)."""
        pipe = self._client.pipeline(transaction=False)
        pipe.set(key, value, ex=self._ttl, get=True)
        pipe.wait(self._wait_replicas, self._wait_milliseconds)
        previous, acknowledged = pipe.execute()
        if acknowledged < self._wait_replicas:
            self._undo(key, address, previous)
            raise StoreUnavailable(
                f"redis: {acknowledged} of {self._wait_replicas} replicas confirmed the login"
            )
        result: bytes | str | None = previous
        return result

    def _undo(self, key: str, address: IPAddress, previous: bytes | str | None) -> None:
        # The master keeps serving lookups: leave it as it was before this login.
        earlier = None if previous is None else _decode(address, previous)
        if previous is None or earlier is None or earlier.expires_at <= self._clock.time():
            self._client.delete(key)
        else:
            self._client.set(key, previous, pxat=int(earlier.expires_at * 1000))

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
            address = parse_stored_key(_text(key)[len(self._prefix) :])
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
