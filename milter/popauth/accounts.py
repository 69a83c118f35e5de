"""Accounts: the block list, and per-user usage of each way to relay.

The usage ledger answers the phase-out question "who still relies on POP
first?": per user, how many messages (and recipients) were relayed because
of a POP/IMAP login and how many because of SMTP AUTH, and when each was
first and last seen. It is bounded (least recently active users drop out
first) and saved like the whitelist snapshot.

The block list names users whose logins the ingest endpoint refuses. It is
written through on every change: a block must survive any restart.
"""

from __future__ import annotations

import abc
import enum
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis
from cachetools import LRUCache

from popauth.clock import Clock
from popauth.persistence import StateFileError, read_json_document, write_json_atomically
from popauth.store.base import StoreUnavailable


class RelayWay(enum.Enum):
    POP_FIRST = "pop"
    SMTP_AUTH = "auth"


@dataclass(slots=True)
class Usage:
    pop_messages: int = 0
    pop_recipients: int = 0
    pop_first_seen: float = 0.0
    pop_last_seen: float = 0.0
    auth_messages: int = 0
    auth_recipients: int = 0
    auth_first_seen: float = 0.0
    auth_last_seen: float = 0.0

    def add(self, way: RelayWay, messages: int, recipients: int, now: float) -> None:
        if way is RelayWay.POP_FIRST:
            self.pop_messages += messages
            self.pop_recipients += recipients
            self.pop_first_seen = self.pop_first_seen or now
            self.pop_last_seen = now
        else:
            self.auth_messages += messages
            self.auth_recipients += recipients
            self.auth_first_seen = self.auth_first_seen or now
            self.auth_last_seen = now


USAGE_FORMAT = "popauth-usage"
USAGE_VERSION = 1


class UsageLedger:
    def __init__(self, *, max_users: int, clock: Clock) -> None:
        self._clock = clock
        self._users: LRUCache[str, Usage] = LRUCache(maxsize=max_users)
        self._lock = threading.Lock()

    def record(self, user: str, way: RelayWay, *, messages: int, recipients: int) -> None:
        if not user:
            return
        now = self._clock.time()
        with self._lock:
            usage = self._users.get(user)
            if usage is None:
                usage = self._users[user] = Usage()
            usage.add(way, messages, recipients, now)

    def pop_first_users(self) -> list[tuple[str, Usage]]:
        """Users who relayed by POP first, most recently seen first."""
        with self._lock:
            rows = [(user, Usage(**asdict(u))) for user, u in self._users.items()]
        relying = [(user, usage) for user, usage in rows if usage.pop_messages]
        return sorted(relying, key=lambda row: row[1].pop_last_seen, reverse=True)

    def get(self, user: str) -> Usage | None:
        with self._lock:
            usage = self._users.get(user)
            return None if usage is None else Usage(**asdict(usage))

    def save(self, path: Path) -> None:
        with self._lock:
            users = {user: asdict(usage) for user, usage in self._users.items()}
        write_json_atomically(
            path, {"format": USAGE_FORMAT, "version": USAGE_VERSION, "users": users}
        )

    def load(self, path: Path) -> int:
        """Merge a saved ledger; raises StateFileError for a bad file."""
        document = read_json_document(path, USAGE_FORMAT, USAGE_VERSION)
        users = document.get("users")
        if not isinstance(users, dict):
            raise StateFileError("no user table")
        loaded: dict[str, Usage] = {}
        for user, fields in users.items():
            try:
                loaded[str(user)] = Usage(**_numbers(fields))
            except TypeError:
                raise StateFileError(f"usage of {user!r} is malformed") from None
        with self._lock:
            # Oldest activity first, so the LRU order matches how recent it is.
            for user, usage in sorted(loaded.items(), key=lambda kv: _last_seen(kv[1])):
                self._users[user] = usage
        return len(loaded)


def _numbers(fields: Any) -> dict[str, Any]:
    if not isinstance(fields, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in fields.values()
    ):
        raise TypeError
    return fields


def _last_seen(usage: Usage) -> float:
    return max(usage.pop_last_seen, usage.auth_last_seen)


# --- the block list ---------------------------------------------------------


class BlockList(abc.ABC):
    @abc.abstractmethod
    def add(self, user: str) -> bool:
        """Block ``user``; False if already blocked."""

    @abc.abstractmethod
    def remove(self, user: str) -> bool:
        """Unblock ``user``; False if not blocked."""

    @abc.abstractmethod
    def __contains__(self, user: object) -> bool: ...

    @abc.abstractmethod
    def users(self) -> list[str]: ...


BLOCK_FORMAT = "popauth-blocklist"
BLOCK_VERSION = 1


class FileBlockList(BlockList):
    """The embedded store's block list, one JSON file rewritten on each change.

    A damaged file stops popauth at start (StateFileError): starting without
    it would let blocked users relay again.
    """

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._users: set[str] = set()
        self._lock = threading.Lock()
        if path is not None:
            try:
                document = read_json_document(path, BLOCK_FORMAT, BLOCK_VERSION)
            except StateFileError as problem:
                if str(problem) != "no such file":
                    raise StateFileError(f"block list {path}: {problem}") from None
                return
            users = document.get("users")
            if not isinstance(users, list) or not all(isinstance(u, str) for u in users):
                raise StateFileError(f"block list {path}: malformed user list")
            self._users = set(users)

    def _write(self) -> None:
        if self._path is not None:
            document = {"format": BLOCK_FORMAT, "version": BLOCK_VERSION}
            write_json_atomically(self._path, {**document, "users": sorted(self._users)})

    def add(self, user: str) -> bool:
        with self._lock:
            if user in self._users:
                return False
            self._users.add(user)
            self._write()
            return True

    def remove(self, user: str) -> bool:
        with self._lock:
            if user not in self._users:
                return False
            self._users.discard(user)
            self._write()
            return True

    def __contains__(self, user: object) -> bool:
        with self._lock:
            return user in self._users

    def users(self) -> list[str]:
        with self._lock:
            return sorted(self._users)


class RedisBlockList(BlockList):
    """The block list of a Redis-backed site: one set, shared by every host."""

    def __init__(self, client: redis.Redis, key: str) -> None:
        self._client = client
        self._key = key

    def _call(self, method: str, *args: str) -> Any:
        try:
            return getattr(self._client, method)(self._key, *args)
        except redis.RedisError as error:
            raise StoreUnavailable(f"redis: {error}") from error

    def add(self, user: str) -> bool:
        return bool(self._call("sadd", user))

    def remove(self, user: str) -> bool:
        return bool(self._call("srem", user))

    def __contains__(self, user: object) -> bool:
        return isinstance(user, str) and bool(self._call("sismember", user))

    def users(self) -> list[str]:
        members = self._call("smembers")
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)
