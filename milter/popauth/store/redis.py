"""A whitelist in Redis, shared by every POP and MTA host.

Each entry is one key, ``PREFIX + address``: a hash with a field per user
who logged in from the address, whose value holds that user's login and
expiry times ("granted expires", epoch seconds). The key carries its own
expiry, its last member's (``PEXPIRE``), so Redis drops the address on time
for every host at once. Every change is a Lua script that first drops the
members that have expired (on the writing host's clock, as the times in
the values are: keep the hosts' clocks in step), so a login, a renewal, a
revoke of a user and the bound per address (``max_users_per_address``: a
new user pushes out the member that expires soonest) are each one atomic
step. A lookup reads the hash (``HGETALL``) and counts only the members
still live.

An entry written by earlier releases (one user) is one string "granted expires
user". A lookup or listing reads it as an entry of that one user, and the
first change to it turns it into a hash; so an upgrade keeps every client
whitelisted. A host still running the old release reads a hash as an
error and fails closed (tempfail): upgrade every host together.

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
    MAX_USERS_PER_ADDRESS,
    BudgetSpend,
    BudgetUse,
    Entry,
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

# An entry's live members, on the server: {user, value, expiry} each.
# Expired members are deleted on the way. An entry in the format of earlier
# releases (a string "granted expires user", one user) becomes a hash of
# that one member first. A value that is not popauth's is left alone,
# except by a login (``replace_foreign``), which writes over it. ``now`` is
# the caller's clock, as in the values. ``settle`` gives the key its last
# member's expiry as its own (so Redis drops the address when its last
# member expires), or deletes it.
_MEMBERS = """
local function expiry_of(value)
  return tonumber(string.match(value, '^[^ ]+ ([^ ]+)$'))
end
local function settle(key, now)
  local latest = nil
  for _, value in ipairs(redis.call('HVALS', key)) do
    local expires = expiry_of(value)
    if expires and (latest == nil or expires > latest) then latest = expires end
  end
  if latest == nil or latest <= now then
    redis.call('DEL', key)
  else
    redis.call('PEXPIRE', key, math.ceil((latest - now) * 1000))
  end
end
local function members(key, now, replace_foreign)
  local kind = redis.call('TYPE', key)['ok']
  if kind == 'string' then
    local raw = redis.call('GET', key)
    local granted, expires, user = string.match(raw, '^([^ ]+) ([^ ]+) (.*)$')
    if user and tonumber(expires) and tonumber(granted) then
      redis.call('DEL', key)
      redis.call('HSET', key, user, granted .. ' ' .. expires)
      settle(key, now)
    elseif replace_foreign then
      redis.call('DEL', key)
      return {}
    else
      return {}
    end
  elseif kind ~= 'hash' then
    if replace_foreign and kind ~= 'none' then redis.call('DEL', key) end
    return {}
  end
  local all = redis.call('HGETALL', key)
  local live = {}
  for i = 1, #all, 2 do
    local expires = expiry_of(all[i + 1])
    if expires and expires > now then
      live[#live + 1] = {all[i], all[i + 1], expires}
    else
      redis.call('HDEL', key, all[i])
    end
  end
  return live
end
"""

# LOGIN in one step on the server: refuse a blocked user (-1), else write
# the user's membership and return {the value it replaced, the member
# pushed out for room and its value} ('' for none). When the address holds
# max_users members already, a new user pushes out the one expiring soonest.
# KEYS[1] the entry, KEYS[2] the block list; ARGV[1] the user's caseless
# form, ARGV[2] the user, ARGV[3] the new value, ARGV[4] now, ARGV[5] max_users.
_GRANT_SCRIPT = (
    _BLOCKED
    + _MEMBERS
    + """
if blocked(KEYS[2], ARGV[1], ARGV[2]) then return -1 end
local now = tonumber(ARGV[4])
local live = members(KEYS[1], now, true)
local previous, displaced, displaced_value = '', '', ''
local soonest = nil
for _, member in ipairs(live) do
  if member[1] == ARGV[2] then previous = member[2] end
  if soonest == nil or member[3] < soonest[3] then soonest = member end
end
if previous == '' and #live >= tonumber(ARGV[5]) and soonest then
  displaced, displaced_value = soonest[1], soonest[2]
  redis.call('HDEL', KEYS[1], displaced)
end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
settle(KEYS[1], now)
return {previous, displaced, displaced_value}
"""
)

# Undo a login that the replicas did not confirm: put back the user's
# membership as it was (or remove it) and the member it pushed out.
# KEYS[1] the entry; ARGV[1] the user, ARGV[2] the value it replaced ('':
# none), ARGV[3] the member pushed out ('': none), ARGV[4] its value, ARGV[5] now.
_UNDO_GRANT_SCRIPT = (
    _MEMBERS
    + """
local now = tonumber(ARGV[5])
members(KEYS[1], now, true)
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], ARGV[3], ARGV[4]) end
members(KEYS[1], now)
settle(KEYS[1], now)
return 1
"""
)

# RENEW of a batch of sessions in one step, each on its own terms: refuse a
# blocked user (-1); extend the user's membership only while it is live
# (never create it, so a revoke wins), with a new value (1); else change
# nothing (0). Other members are left alone. One result per session, in order.
# KEYS[1] the block list, KEYS[1 + i] the entry of session i; ARGV[1] now,
# then three per session: the user's caseless form, the user, the new value.
_RENEW_SCRIPT = (
    _BLOCKED
    + _MEMBERS
    + """
local now = tonumber(ARGV[1])
local results = {}
for i = 2, #KEYS do
  local at = 3 * i - 4
  local user = ARGV[at + 1]
  local result = 0
  if blocked(KEYS[1], ARGV[at], user) then
    result = -1
  else
    for _, member in ipairs(members(KEYS[i], now)) do
      if member[1] == user then
        redis.call('HSET', KEYS[i], user, ARGV[at + 2])
        settle(KEYS[i], now)
        result = 1
        break
      end
    end
  end
  results[i - 1] = result
end
return results
"""
)
# Sessions per script call: a call holds Redis for its whole length (a few
# microseconds per session), and its arguments are sent in one piece.
RENEWALS_PER_CALL = 500

# REVOKE of an address: every live member as {user, value, ...}, and the
# entry gone. KEYS[1] the entry; ARGV[1] now.
_REVOKE_SCRIPT = (
    _MEMBERS
    + """
local live = members(KEYS[1], tonumber(ARGV[1]))
redis.call('DEL', KEYS[1])
local removed = {}
for _, member in ipairs(live) do
  removed[#removed + 1] = member[1]
  removed[#removed + 1] = member[2]
end
return removed
"""
)

# Remove one user's membership found by a listing, if it is still live;
# the other members stay, and the entry goes with its last member. Returns
# the removed value or false. KEYS[1] the entry; ARGV[1] the user as
# stored, ARGV[2] now.
_REVOKE_MEMBER_SCRIPT = (
    _MEMBERS
    + """
local now = tonumber(ARGV[2])
for _, member in ipairs(members(KEYS[1], now)) do
  if member[1] == ARGV[1] then
    redis.call('HDEL', KEYS[1], ARGV[1])
    settle(KEYS[1], now)
    return member[2]
  end
end
return false
"""
)

# Policies that evict only keys with an expiry (the entries, never the block
# list), or nothing. Anything else, allkeys-* and whatever comes next, may
# evict the block list.
SAFE_EVICTION_POLICIES = frozenset(
    {"noeviction", "volatile-lru", "volatile-lfu", "volatile-random", "volatile-ttl"}
)


_BLOCKED_RENEWAL = Renewal(blocked=True)


# One relayed recipient against an address's budget: a hash of "used" and,
# once a recipient was refused, "warned". The window opens with the first
# recipient counted (PEXPIRE), so Redis ends it on time for every host. One
# over the limit is not counted; HSETNX tells the first refusal of a window.
_SPEND_BUDGET_SCRIPT = """
local key, limit, window = KEYS[1], tonumber(ARGV[1]), ARGV[2]
local used = tonumber(redis.call('HGET', key, 'used') or '0')
local allowed, first = 0, 0
if used < limit then
  used = redis.call('HINCRBY', key, 'used', 1)
  allowed = 1
else
  first = redis.call('HSETNX', key, 'warned', '1')
end
if redis.call('PTTL', key) < 0 then redis.call('PEXPIRE', key, window) end
return {allowed, math.max(limit - used, 0), first}
"""


def glob_escaped(text: str) -> str:
    """``text`` as a literal in a Redis glob pattern (SCAN MATCH)."""
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


def _encode(grant: Grant) -> str:
    """A member's value in its entry's hash (the user is the field)."""
    return f"{grant.granted_at:.3f} {grant.expires_at:.3f}"


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _member(address: IPAddress, user: bytes | str, raw: bytes | str) -> Grant | None:
    try:
        granted, expires = _text(raw).split(" ")
        return Grant(address, _text(user), float(granted), float(expires))
    except (UnicodeDecodeError, ValueError):
        return None  # not ours or damaged: never counts as whitelisted


def _legacy(address: IPAddress, raw: bytes | str) -> Grant | None:
    """An entry as earlier releases wrote it: one string "granted expires user"."""
    try:
        granted, expires, user = _text(raw).split(" ", 2)
        return Grant(address, user, float(granted), float(expires))
    except (UnicodeDecodeError, ValueError):
        return None


def _entry_of(address: IPAddress, members: list[Grant], now: float) -> Entry | None:
    """The live ``members`` as an entry, oldest login first; None when none is live."""
    live = sorted((m for m in members if m.expires_at > now), key=lambda m: m.granted_at)
    return Entry(address, tuple(live)) if live else None


def _pairs(flat: Sequence[bytes | str]) -> list[tuple[bytes | str, bytes | str]]:
    return list(zip(flat[0::2], flat[1::2], strict=True))


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
        max_users_per_address: int = MAX_USERS_PER_ADDRESS,
    ) -> None:
        self._ttl = ttl
        self._max_users = max_users_per_address
        self._prefix = key_prefix
        self._clock = clock
        self._client = client
        self._renew_script = self._client.register_script(_RENEW_SCRIPT)
        self._revoke_member_script = self._client.register_script(_REVOKE_MEMBER_SCRIPT)
        self._revoke_script = self._client.register_script(_REVOKE_SCRIPT)
        self._grant_script = self._client.register_script(_GRANT_SCRIPT)
        self._undo_grant_script = self._client.register_script(_UNDO_GRANT_SCRIPT)
        self._spend_budget_script = self._client.register_script(_SPEND_BUDGET_SCRIPT)
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
    def graduates_key(self) -> str:
        """The hash of users who graduated from POP-first to SMTP AUTH."""
        return graduates_key_of(self._prefix)

    @property
    def _changes_key(self) -> str:
        # Bumped before each WAIT for a block, unblock or revoke: a write that
        # always replicates, so the WAIT confirms everything the master held
        # before it, even when the change itself wrote nothing (a repeated
        # block, a revoke of what an earlier, unconfirmed revoke removed).
        return f"{self._prefix}changes"

    def _key(self, address: IPAddress) -> str:
        return f"{self._prefix}{address}"

    def _budget_key(self, address: IPAddress) -> str:
        # Not an address after the prefix: listings pass it by.
        return f"{self._prefix}budget:{address}"

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
        args: list[str | int | float] = [
            *self._user_arguments(user),
            _encode(grant),
            f"{now:.3f}",
            self._max_users,
        ]
        self._refuse_unless_eviction_is_safe()
        try:
            if self._wait_replicas:
                result = self._grant_on_replicas(key, user, keys, args)
            else:
                result = self._grant_script(keys=keys, args=args)
        except redis.RedisError as error:
            raise StoreUnavailable(f"redis: {error}") from error
        if result == -1:
            raise UserBlocked(user)
        previous, displaced_user, displaced_value = self._grant_result(result)
        renewed = previous != ""
        displaced = None
        if displaced_user or displaced_value:
            displaced = _member(address, displaced_user, displaced_value)
        self._count(grants=1, renewals=int(renewed))
        return GrantOutcome(grant, renewed, displaced=displaced)

    @staticmethod
    def _grant_result(result: Any) -> tuple[str, str, str]:
        if not isinstance(result, list) or len(result) != 3:
            raise StoreUnavailable(f"redis: the login script answered {result!r:.100}")
        previous, displaced_user, displaced_value = (_text(part) for part in result)
        return previous, displaced_user, displaced_value

    def _grant_on_replicas(
        self, key: str, user: str, keys: list[str], args: list[str | int | float]
    ) -> Any:
        """The login script, then WAIT on the same connection (one round trip for both)."""
        pipe = self._client.pipeline(transaction=False)
        # EVAL, not EVALSHA: a pipeline cannot reload a script the server lost.
        pipe.eval(_GRANT_SCRIPT, len(keys), *keys, *args)
        pipe.wait(self._wait_replicas, self._wait_milliseconds)
        result, acknowledged = pipe.execute()
        if result != -1 and acknowledged < self._wait_replicas:
            previous, displaced_user, displaced_value = self._grant_result(result)
            # The master keeps serving lookups: leave it as it was before this login.
            self._undo_grant_script(
                keys=[key],
                args=[user, previous, displaced_user, displaced_value, f"{self._clock.time():.3f}"],
            )
            raise NotConfirmed(acknowledged, self._wait_replicas, undone=True)
        return result

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
        args: list[str | int] = [f"{now:.3f}"]
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

    def lookup(self, address: IPAddress) -> Entry | None:
        key = self._key(address)
        try:
            try:
                members = [
                    member
                    for user, raw in self._client.hgetall(key).items()
                    if (member := _member(address, user, raw)) is not None
                ]
            except redis.exceptions.ResponseError:
                # WRONGTYPE: an entry of the one-user format, until a change converts it.
                members = self._legacy_members(address, key)
        except redis.RedisError as error:
            raise StoreUnavailable(f"redis: {error}") from error
        entry = _entry_of(address, members, self._clock.time())
        self._count(lookups=1, hits=int(entry is not None))
        return entry

    def _legacy_members(self, address: IPAddress, key: str) -> list[Grant]:
        raw = self._client.get(key)
        legacy = None if raw is None else _legacy(address, raw)
        return [] if legacy is None else [legacy]

    def revoke(self, address: IPAddress) -> Entry | None:
        now = self._clock.time()
        try:
            flat = self._revoke_script(keys=[self._key(address)], args=[f"{now:.3f}"])
        except redis.RedisError as error:
            raise StoreUnavailable(f"redis: {error}") from error
        members = [
            member
            for user, raw in _pairs(flat)
            if (member := _member(address, user, raw)) is not None
        ]
        entry = _entry_of(address, members, now)
        self._count(revocations=int(entry is not None))
        return entry

    def revoke_user(self, user: str) -> list[Grant]:
        wanted = user_key(user)
        removed = []
        for grant in self.entries():
            if user_key(grant.user) != wanted:
                continue
            try:
                raw = self._revoke_member_script(
                    keys=[self._key(grant.address)],
                    args=[grant.user, f"{self._clock.time():.3f}"],
                )
            except redis.RedisError as error:
                raise StoreUnavailable(f"redis: {error}") from error
            gone = None if raw is None else _member(grant.address, grant.user, raw)
            if gone is not None:
                removed.append(gone)
        self._count(revocations=len(removed))
        return removed

    def entries(self) -> list[Grant]:
        grants = [grant for entry in self._entries() for grant in entry.grants]
        return sorted(grants, key=lambda grant: grant.granted_at)

    def _entries(self) -> list[Entry]:
        found: list[Entry] = []
        # The prefix is a literal: "mail[1]:" must not match "mail1:...".
        pattern = f"{glob_escaped(self._prefix)}*"
        try:
            addressed = [
                (key, address)
                for key in self._client.scan_iter(match=pattern, count=1000)
                if (address := self._address_of(key)) is not None
            ]
            for start in range(0, len(addressed), 1000):
                batch = addressed[start : start + 1000]
                pipe = self._client.pipeline(transaction=False)
                for key, _ in batch:
                    pipe.hgetall(key)
                replies = pipe.execute(raise_on_error=False)
                now = self._clock.time()
                for (key, address), reply in zip(batch, replies, strict=True):
                    if isinstance(reply, redis.exceptions.ResponseError):
                        members = self._legacy_members(address, _text(key))
                    elif isinstance(reply, Exception):
                        raise reply
                    else:
                        members = [
                            member
                            for user, raw in reply.items()
                            if (member := _member(address, user, raw)) is not None
                        ]
                    entry = _entry_of(address, members, now)
                    if entry is not None:
                        found.append(entry)
        except redis.RedisError as error:
            raise StoreUnavailable(f"redis: {error}") from error
        return sorted(found, key=lambda entry: entry.grants[0].granted_at)

    def _address_of(self, key: bytes | str) -> IPAddress | None:
        try:
            return parse_stored_key(_text(key)[len(self._prefix) :])
        except (UnicodeDecodeError, AddressError):
            return None  # the block list and other state beside the entries

    def stats(self) -> StoreStats:
        entries = len(self._entries())
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

    def spend_budget(self, address: IPAddress, limit: int, window: float) -> BudgetSpend:
        milliseconds = max(1, round(window * 1000))
        try:
            allowed, remaining, first = self._spend_budget_script(
                keys=[self._budget_key(address)], args=[limit, milliseconds]
            )
        except redis.RedisError as error:
            raise StoreUnavailable(f"redis: {error}") from error
        return BudgetSpend(bool(allowed), int(remaining), bool(first))

    def budget_use(self, address: IPAddress) -> BudgetUse:
        key = self._budget_key(address)
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.hget(key, "used")
            pipe.pttl(key)
            used, milliseconds = pipe.execute()
        except redis.RedisError as error:
            raise StoreUnavailable(f"redis: {error}") from error
        if used is None or milliseconds < 0:
            return BudgetUse(0, None)
        return BudgetUse(int(used), self._clock.time() + milliseconds / 1000)

    def ping(self) -> bool:
        try:
            return bool(self._client.ping())
        except redis.RedisError:
            return False

    def close(self) -> None:
        self._client.close()


def graduates_key_of(prefix: str) -> str:
    """The graduates' hash under the key prefix ``prefix`` (``redis_key_prefix``)."""
    return f"{prefix}pop-first-graduates"
