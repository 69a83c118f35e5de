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

Replication is asynchronous, so a change written to the master just before
it dies may be missing on the replica that takes over. ``wait_replicas``
makes every change wait (``WAIT``) until that many replicas hold it before
it is acknowledged. A login they do not confirm in time is undone and
refused; a block, unblock or revoke stays in force on the master and is
answered as not confirmed (undoing it would reopen what it closed). A
renewal does not wait: losing one only lets an entry expire sooner.

The block list is a set beside the entries (``blocklist_key``). A login
checks it and writes its entry in one script, so a block added before the
script runs refuses the login, and one added after it finds the entry and
revokes it: a login in flight never outlives a block.

Eviction: a Redis whose ``maxmemory-policy`` may evict keys without an
expiry could drop the block list. :meth:`RedisStore.eviction_policy_problem`
says so; popauth then refuses to start, and refuses logins until the
policy has been seen to be safe.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.connection import SSLConnection, parse_url
from redis.retry import Retry
from redis.sentinel import Sentinel

from popauth.basics.addresses import AddressError, IPAddress, parse_stored_key
from popauth.basics.clock import Clock
from popauth.basics.usernames import user_key
from popauth.store.base import (
    Grant,
    GrantOutcome,
    NotConfirmed,
    Renewal,
    StoreStats,
    StoreUnavailable,
    UserBlocked,
    WhitelistStore,
)

# Whether a user is on the block list: its caseless form or the name as
# given (a member written before names were kept caseless still counts).
# An empty caseless form is an anonymous login, which no block concerns.
_BLOCKED = """
local function blocked(blocklist, folded, user)
  return folded ~= '' and (redis.call('SISMEMBER', blocklist, folded) == 1
    or redis.call('SISMEMBER', blocklist, user) == 1)
end
"""

# LOGIN in one step on the server: refuse a blocked user, else write the
# entry with its expiry and return the value it replaced (0: none).
# KEYS[1] the entry, KEYS[2] the block list; ARGV[1] the user's caseless
# form, ARGV[2] the user, ARGV[3] the new value, ARGV[4] the ttl.
_GRANT_SCRIPT = (
    _BLOCKED
    + """
if blocked(KEYS[2], ARGV[1], ARGV[2]) then return -1 end
local previous = redis.call('SET', KEYS[1], ARGV[3], 'EX', ARGV[4], 'GET')
if previous then return previous end
return 0
"""
)

# RENEW of a batch of sessions in one step, each on its own terms: refuse a
# blocked user (-1); extend the key only while it exists and belongs to the
# user (never create it, so a revoke wins), with a new value and a new
# expiry (1); else change nothing (0). One result per session, in order.
# KEYS[1] the block list, KEYS[1 + i] the entry of session i; ARGV[1] the
# ttl, then three per session: the user's caseless form, the user, the new value.
_RENEW_SCRIPT = (
    _BLOCKED
    + """
local results = {}
for i = 2, #KEYS do
  local at = 3 * i - 4
  local user = ARGV[at + 1]
  local result = 0
  if blocked(KEYS[1], ARGV[at], user) then
    result = -1
  else
    local raw = redis.call('GET', KEYS[i])
    if raw and string.match(raw, '^[^ ]+ [^ ]+ (.*)$') == user then
      redis.call('SET', KEYS[i], ARGV[at + 2], 'EX', ARGV[1])
      result = 1
    end
  end
  results[i - 1] = result
end
return results
"""
)
# Sessions per script call: a call holds Redis for its whole length (about
# a microsecond per session), and its arguments are sent in one piece.
RENEWALS_PER_CALL = 500

# Revoke one entry of a user found by a listing, only if it is still that
# user's: another user may have logged in from the address since. Returns
# the removed value or false. KEYS[1] the entry; ARGV[1] the user as stored.
_REVOKE_IF_USER_SCRIPT = """
local raw = redis.call('GET', KEYS[1])
if not raw then return false end
if string.match(raw, '^[^ ]+ [^ ]+ (.*)$') ~= ARGV[1] then return false end
redis.call('DEL', KEYS[1])
return raw
"""

# Policies that evict only keys with an expiry (the entries, never the block
# list), or nothing. Anything else, allkeys-* and whatever comes next, may
# evict the block list.
SAFE_EVICTION_POLICIES = frozenset(
    {"noeviction", "volatile-lru", "volatile-lfu", "volatile-random", "volatile-ttl"}
)


_BLOCKED_RENEWAL = Renewal(blocked=True)


def glob_escaped(text: str) -> str:
    """``text`` as a literal in a Redis glob pattern (SCAN MATCH)."""
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


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


class SentinelOptions(Protocol):
    """Where the sentinels are, which master to ask for, and how to talk to them
    (the store's settings group, ``settings.store``).

    The credentials and TLS here are the sentinels' own; the master's come
    from the Redis URL.
    """

    def sentinel_addresses(self) -> tuple[tuple[str, int], ...]: ...
    @property
    def redis_sentinel_service(self) -> str: ...
    @property
    def redis_sentinel_username(self) -> str | None: ...
    @property
    def redis_sentinel_password(self) -> str | None: ...
    @property
    def redis_sentinel_tls(self) -> bool: ...
    @property
    def redis_sentinel_tls_ca_file(self) -> str | None: ...
    @property
    def redis_sentinel_tls_cert_file(self) -> str | None: ...
    @property
    def redis_sentinel_tls_key_file(self) -> str | None: ...


def sentinel_connection_options(sentinel: SentinelOptions, timeout: float) -> dict[str, Any]:
    """The options of a connection to a sentinel itself."""
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    if sentinel.redis_sentinel_username:
        options["username"] = sentinel.redis_sentinel_username
    if sentinel.redis_sentinel_password:
        options["password"] = sentinel.redis_sentinel_password
    if sentinel.redis_sentinel_tls:
        options["ssl"] = True
        options["ssl_ca_certs"] = sentinel.redis_sentinel_tls_ca_file
        options["ssl_certfile"] = sentinel.redis_sentinel_tls_cert_file
        options["ssl_keyfile"] = sentinel.redis_sentinel_tls_key_file
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


def connect(url: str, timeout: float, sentinel: SentinelOptions | None = None) -> redis.Redis:
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
        list(sentinel.sentinel_addresses()),
        sentinel_kwargs=sentinel_connection_options(sentinel, timeout),
        **_no_retries(timeout),
        **master_options,
    )
    client: redis.Redis = manager.master_for(sentinel.redis_sentinel_service)
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
        self._revoke_if_user_script = self._client.register_script(_REVOKE_IF_USER_SCRIPT)
        self._grant_script = self._client.register_script(_GRANT_SCRIPT)
        self._wait_replicas = wait_replicas
        self._wait_milliseconds = max(1, round(wait_timeout * 1000))
        # Set once maxmemory-policy has been seen to be safe; until then
        # every login checks it first (Redis may have been down at start).
        self._eviction_policy_safe = False
        # Counters of this process only; Redis holds the shared entries.
        self._counts: Counter[str] = Counter()
        self._counts_lock = threading.Lock()

    @property
    def client(self) -> redis.Redis:
        """The connection, for state that lives next to the whitelist."""
        return self._client

    @property
    def blocklist_key(self) -> str:
        """The set of blocked users that logins are checked against."""
        return f"{self._prefix}blocked-users"

    @property
    def _changes_key(self) -> str:
        # Bumped before each WAIT for a block, unblock or revoke: a write that
        # always replicates, so the WAIT confirms everything the master held
        # before it, even when the change itself wrote nothing (a repeated
        # block, a revoke of what an earlier, unconfirmed revoke removed).
        return f"{self._prefix}changes"

    def _key(self, address: IPAddress) -> str:
        return f"{self._prefix}{address}"

    def _count(self, **increments: int) -> None:
        with self._counts_lock:
            self._counts.update(increments)

    def eviction_policy_problem(self) -> str | None:
        """Why Redis's ``maxmemory-policy`` may lose the block list, or None.

        Read with ``INFO memory``, else ``CONFIG GET``; when the ACL allows
        neither, that is a problem too (fail closed: popauth cannot tell).
        Raises StoreUnavailable when Redis does not answer.
        """
        try:
            policy = self._eviction_policy()
        except redis.exceptions.NoPermissionError:
            return (
                "cannot read Redis's maxmemory-policy: the ACL allows neither INFO nor "
                "CONFIG GET to popauth's Redis user; allow +info"
            )
        except redis.RedisError as error:
            raise StoreUnavailable(f"redis: {error}") from error
        if policy not in SAFE_EVICTION_POLICIES:
            return (
                f"Redis's maxmemory-policy is {policy!r}, which may evict the block list; "
                "set maxmemory-policy to volatile-ttl (or noeviction, or another volatile-* policy)"
            )
        self._eviction_policy_safe = True
        return None

    def _eviction_policy(self) -> str:
        try:
            memory: dict[str, Any] = self._client.info("memory")
            if "maxmemory_policy" in memory:
                return str(memory["maxmemory_policy"])
        except redis.exceptions.NoPermissionError:
            pass
        answer: Any = self._client.config_get("maxmemory-policy")
        policy = answer.get("maxmemory-policy", answer.get(b"maxmemory-policy", b""))
        return _text(policy)

    def _refuse_unless_eviction_is_safe(self) -> None:
        if not self._eviction_policy_safe:
            problem = self.eviction_policy_problem()
            if problem is not None:
                raise StoreUnavailable(f"redis: {problem}")

    def _user_arguments(self, user: str) -> list[str]:
        return [user_key(user) if user else "", user]

    def grant(self, address: IPAddress, user: str) -> GrantOutcome:
        now = self._clock.time()
        grant = Grant(address, user, now, now + self._ttl)
        key = self._key(address)
        keys = [key, self.blocklist_key]
        args: list[str | int] = [*self._user_arguments(user), _encode(grant), self._ttl]
        self._refuse_unless_eviction_is_safe()
        try:
            if self._wait_replicas:
                previous = self._grant_on_replicas(address, keys, args)
            else:
                previous = self._grant_script(keys=keys, args=args)
        except redis.RedisError as error:
            raise StoreUnavailable(f"redis: {error}") from error
        if previous == -1:
            raise UserBlocked(user)
        renewed = previous != 0
        self._count(grants=1, renewals=int(renewed))
        return GrantOutcome(grant, renewed)

    def _grant_on_replicas(self, address: IPAddress, keys: list[str], args: list[str | int]) -> Any:
        """The login script, then WAIT on the same connection (one round trip for both)."""
        pipe = self._client.pipeline(transaction=False)
        # EVAL, not EVALSHA: a pipeline cannot reload a script the server lost.
        pipe.eval(_GRANT_SCRIPT, len(keys), *keys, *args)
        pipe.wait(self._wait_replicas, self._wait_milliseconds)
        previous, acknowledged = pipe.execute()
        if previous != -1 and acknowledged < self._wait_replicas:
            self._undo(keys[0], address, None if previous == 0 else previous)
            raise NotConfirmed(acknowledged, self._wait_replicas, undone=True)
        return previous

    def renew(self, address: IPAddress, user: str) -> Grant | None:
        (outcome,) = self.renew_many([(address, user)])
        if outcome.blocked:
            raise UserBlocked(user)
        return outcome.grant

    def renew_many(self, sessions: Sequence[tuple[IPAddress, str]]) -> list[Renewal]:
        """One script call per :data:`RENEWALS_PER_CALL` sessions (see the script)."""
        outcomes: list[Renewal] = []
        for start in range(0, len(sessions), RENEWALS_PER_CALL):
            outcomes += self._renew_batch(sessions[start : start + RENEWALS_PER_CALL])
        return outcomes

    def _renew_batch(self, sessions: Sequence[tuple[IPAddress, str]]) -> list[Renewal]:
        now = self._clock.time()
        expires = now + self._ttl
        grants = [Grant(address, user, now, expires) for address, user in sessions]
        keys = [self.blocklist_key]
        args: list[str | int] = [self._ttl]
        for grant in grants:
            keys.append(self._key(grant.address))
            args += [*self._user_arguments(grant.user), _encode(grant)]
        try:
            results = self._renew_script(keys=keys, args=args)
        except redis.RedisError as error:
            raise StoreUnavailable(f"redis: {error}") from error
        if not isinstance(results, list) or len(results) != len(grants):
            raise StoreUnavailable(f"redis: the renewal script answered {results!r:.100}")
        return [
            _BLOCKED_RENEWAL if result == -1 else Renewal(grant if result == 1 else None)
            for grant, result in zip(grants, results, strict=True)
        ]

    def _undo(self, key: str, address: IPAddress, previous: bytes | str | None) -> None:
        # The master keeps serving lookups: leave it as it was before this login.
        earlier = None if previous is None else _decode(address, previous)
        if previous is None or earlier is None or earlier.expires_at <= self._clock.time():
            self._client.delete(key)
        else:
            self._client.set(key, previous, pxat=int(earlier.expires_at * 1000))

    def confirm_changes(self) -> None:
        if not self._wait_replicas:
            return
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.incr(self._changes_key)
            pipe.wait(self._wait_replicas, self._wait_milliseconds)
            _, acknowledged = pipe.execute()
        except redis.RedisError as error:
            # The change itself was made: it is not confirmed, not undone.
            raise NotConfirmed(0, self._wait_replicas, undone=False) from error
        if acknowledged < self._wait_replicas:
            raise NotConfirmed(acknowledged, self._wait_replicas, undone=False)

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
        wanted = user_key(user)
        removed = []
        for grant in self.entries():
            if user_key(grant.user) != wanted:
                continue
            try:
                raw = self._revoke_if_user_script(
                    keys=[self._key(grant.address)], args=[grant.user]
                )
            except redis.RedisError as error:
                raise StoreUnavailable(f"redis: {error}") from error
            gone = None if raw is None else _decode(grant.address, raw)
            if gone is not None:
                removed.append(gone)
        self._count(revocations=len(removed))
        return removed

    def entries(self) -> list[Grant]:
        grants: list[Grant] = []
        # The prefix is a literal: "mail[1]:" must not match "mail1:...".
        pattern = f"{glob_escaped(self._prefix)}*"
        try:
            keys = list(self._client.scan_iter(match=pattern, count=1000))
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
