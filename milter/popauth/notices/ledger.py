"""Which user was sent a notice when, so that nobody is told twice in an interval.

A record per user (by the caseless name, :func:`popauth.basics.usernames.user_key`):
when the last notice was sent and when the next one is due. The record is
claimed *before* the notice is submitted, so that a notice is only sent
when its record is kept: on one host in a small state file written
atomically (:class:`FileNoticeLedger`), across hosts in Redis, where the
claim is ``SET key NX PX`` (:class:`RedisNoticeLedger`): of two MTA hosts
that see the same user at once, one sets the key and sends, the other finds
it set. The key expires when the next notice is due. A submission that
fails gives its claim back (:meth:`NoticeLedger.release`) to be retried.

Apart from the claims, the ledger keeps each user's history for
``popauth report --campaign``: how many notices were sent and when the last
one went (:meth:`NoticeLedger.note_sent`, after a submission succeeded). It
outlives the claims, which are dropped (or expire) once due again: in the
state file under ``history`` (a file without it loads with none), in Redis
in one hash, ``PREFIX notice-history``, user -> ``COUNT LAST_SENT_AT``,
counted by a script (HGET, HSET in one step: two hosts sending at once
count two) and read with HGETALL, commands popauth's ACL has already.
"""

from __future__ import annotations

import abc
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import redis

from popauth.basics.errors import StateFileError, StateFileMissing, StateWriteError
from popauth.basics.usernames import is_valid_user_name, user_key
from popauth.store.base import StoreUnavailable
from popauth.store.statefile import (
    read_json_document,
    saved_count,
    saved_number,
    saved_time,
    write_json_atomically,
)

NOTICES_FORMAT = "popauth-notices"
NOTICES_VERSION = 1


class LedgerUnavailable(StoreUnavailable):
    """The ledger cannot be read or written now; nothing is sent, it is tried again later."""


@dataclass(frozen=True, slots=True)
class Sent:
    """The last notice of one user: sent at ``sent_at``, the next due at ``due_at``."""

    sent_at: float
    due_at: float


@dataclass(frozen=True, slots=True)
class NoticeHistory:
    """How many notices one user was sent, and when the last went."""

    count: int
    last_sent_at: float


class NoticeLedger(abc.ABC):
    @abc.abstractmethod
    def claim(self, user: str, record: Sent, now: float) -> bool:
        """Record ``record`` for ``user`` unless a record still due later is there.

        True: the caller may send. Raises LedgerUnavailable.
        """

    @abc.abstractmethod
    def release(self, user: str, record: Sent) -> None:
        """Give back a claim whose notice was not sent; raises LedgerUnavailable."""

    @abc.abstractmethod
    def records(self, users: list[str], now: float) -> dict[str, Sent]:
        """The current records of ``users`` (by the names given); for ``notices --dry-run``."""

    @abc.abstractmethod
    def note_sent(self, user: str, sent_at: float) -> None:
        """Count a notice sent to ``user``; raises LedgerUnavailable."""

    @abc.abstractmethod
    def history(self) -> dict[str, NoticeHistory]:
        """Every user ever sent a notice (by the caseless name); raises LedgerUnavailable."""


class FileNoticeLedger(NoticeLedger):
    """One host's ledger: in memory, and in a state file written before memory changes."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._records: dict[str, Sent] = {}
        self._history: dict[str, NoticeHistory] = {}
        self._lock = threading.Lock()

    def load(self) -> int:
        """Read the state file; raises StateFileError (StateFileMissing: none yet)."""
        if self._path is None:
            raise StateFileMissing("no notices_path")
        document = read_json_document(self._path, NOTICES_FORMAT, NOTICES_VERSION)
        if not isinstance(document.get("users"), dict):
            raise StateFileError("no user table")
        loaded = _table(document["users"], _record, "malformed record for")
        # A file from before the history has none.
        saved_history = document.get("history", {})
        if not isinstance(saved_history, dict):
            raise StateFileError("malformed history")
        history = _table(saved_history, _history, "malformed history of")
        with self._lock:
            self._records = loaded
            self._history = history
        return len(loaded)

    def _write(
        self, records: dict[str, Sent], history: dict[str, NoticeHistory] | None = None
    ) -> None:
        """Save ``records`` (and ``history``, None: as it is) then make them the
        ledger (the caller holds the lock)."""
        history = self._history if history is None else history
        if self._path is not None:
            document = {
                "format": NOTICES_FORMAT,
                "version": NOTICES_VERSION,
                "users": {
                    user: {"sent_at": sent.sent_at, "due_at": sent.due_at}
                    for user, sent in records.items()
                },
                "history": {
                    user: {"count": told.count, "last_sent_at": told.last_sent_at}
                    for user, told in history.items()
                },
            }
            try:
                write_json_atomically(self._path, document)
            except StateWriteError as error:
                raise LedgerUnavailable(f"notices not saved: {error.strerror}") from None
        self._records = records
        self._history = history

    def note_sent(self, user: str, sent_at: float) -> None:
        key = user_key(user)
        with self._lock:
            before = self._history.get(key)
            count = 1 if before is None else before.count + 1
            self._write(self._records, {**self._history, key: NoticeHistory(count, sent_at)})

    def history(self) -> dict[str, NoticeHistory]:
        with self._lock:
            return dict(self._history)

    def claim(self, user: str, record: Sent, now: float) -> bool:
        key = user_key(user)
        with self._lock:
            found = self._records.get(key)
            if found is not None and found.due_at > now:
                return False
            # Records that are due again say nothing a missing one would not.
            kept = {k: r for k, r in self._records.items() if r.due_at > now}
            self._write({**kept, key: record})
            return True

    def release(self, user: str, record: Sent) -> None:
        key = user_key(user)
        with self._lock:
            if self._records.get(key) == record:
                self._write({k: r for k, r in self._records.items() if k != key})

    def records(self, users: list[str], now: float) -> dict[str, Sent]:
        with self._lock:
            found = {user: self._records.get(user_key(user)) for user in users}
        return {user: sent for user, sent in found.items() if sent is not None}


_Entry = TypeVar("_Entry")


def _table(
    saved: dict[str, object], parse: Callable[[object, object], _Entry | None], problem: str
) -> dict[str, _Entry]:
    """Every user's entry of a saved table; one malformed entry refuses the file."""
    table: dict[str, _Entry] = {}
    for user, fields in saved.items():
        entry = parse(user, fields)
        if entry is None:
            raise StateFileError(f"{problem} {user!r:.80}")
        table[user] = entry
    return table


def _record(user: object, fields: object) -> Sent | None:
    if not is_valid_user_name(user) or not isinstance(fields, dict):
        return None
    if set(fields) != {"sent_at", "due_at"}:
        return None
    sent_at, due_at = saved_time(fields["sent_at"]), saved_time(fields["due_at"])
    if sent_at is None or due_at is None:
        return None
    return Sent(sent_at, due_at)


def _history(user: object, fields: object) -> NoticeHistory | None:
    if not is_valid_user_name(user) or not isinstance(fields, dict):
        return None
    if set(fields) != {"count", "last_sent_at"}:
        return None
    count, last = saved_count(fields["count"], least=1), saved_number(fields["last_sent_at"])
    if count is None or last is None:
        return None
    return NoticeHistory(count, last)


# One step: of two hosts that send at once, both notices are counted.
_NOTE_SENT_SCRIPT = """
local before = redis.call('HGET', KEYS[1], ARGV[1])
local count = 0
if before then count = tonumber(string.match(before, '^(%d+) ')) or 0 end
redis.call('HSET', KEYS[1], ARGV[1], (count + 1) .. ' ' .. ARGV[2])
return count + 1
"""


class RedisNoticeLedger(NoticeLedger):
    """Every host's ledger: a key per user, ``PREFIX notice:USER``, that expires when due.

    Its value is ``SENT_AT DUE_AT``. Commands: SET (NX PX), MGET, DEL; and
    for the history a script (HGET, HSET) and HGETALL.
    """

    def __init__(self, client: redis.Redis, key_prefix: str) -> None:
        self._client = client
        self._prefix = f"{key_prefix}notice:"
        self.history_key = f"{key_prefix}notice-history"
        # Registered on first use: a ledger that only claims never loads it.
        self._note_sent: Any = None

    def key(self, user: str) -> str:
        return self._prefix + user_key(user)

    def claim(self, user: str, record: Sent, now: float) -> bool:
        lifetime = max(1, math.ceil((record.due_at - now) * 1000))
        try:
            done = self._client.set(self.key(user), _value(record), nx=True, px=lifetime)
        except redis.RedisError as error:
            raise LedgerUnavailable(f"redis: {error}") from error
        return bool(done)

    def release(self, user: str, record: Sent) -> None:
        # The key was set NX by this claim and lives until the next notice is
        # due, days on: no other host can hold it yet.
        try:
            self._client.delete(self.key(user))
        except redis.RedisError as error:
            raise LedgerUnavailable(f"redis: {error}") from error

    def records(self, users: list[str], now: float) -> dict[str, Sent]:
        found: dict[str, Sent] = {}
        try:
            values = self._client.mget([self.key(user) for user in users]) if users else []
        except redis.RedisError as error:
            raise LedgerUnavailable(f"redis: {error}") from error
        for user, value in zip(users, values, strict=True):
            record = _parse_value(value)
            if record is not None:
                found[user] = record
        return found

    def note_sent(self, user: str, sent_at: float) -> None:
        if self._note_sent is None:
            self._note_sent = self._client.register_script(_NOTE_SENT_SCRIPT)
        try:
            self._note_sent(keys=[self.history_key], args=[user_key(user), f"{sent_at:.3f}"])
        except redis.RedisError as error:
            raise LedgerUnavailable(f"redis: {error}") from error

    def history(self) -> dict[str, NoticeHistory]:
        try:
            found = self._client.hgetall(self.history_key)
        except redis.RedisError as error:
            raise LedgerUnavailable(f"redis: {error}") from error
        history = {}
        for user, value in found.items():
            try:
                count, last = _text(value).split()
                told = NoticeHistory(int(count), float(last))
            except ValueError:
                continue
            history[_text(user)] = told
        return history


def _value(record: Sent) -> str:
    return f"{record.sent_at:.3f} {record.due_at:.3f}"


def _parse_value(value: object) -> Sent | None:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str):
        return None
    try:
        sent_at, due_at = (float(part) for part in value.split())
    except ValueError:
        return None
    return Sent(sent_at, due_at)


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
