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
"""

from __future__ import annotations

import abc
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import redis

from popauth.basics.errors import StateFileError, StateFileMissing, StateWriteError
from popauth.basics.usernames import is_valid_user_name, user_key
from popauth.store.base import StoreUnavailable
from popauth.store.statefile import read_json_document, write_json_atomically

NOTICES_FORMAT = "popauth-notices"
NOTICES_VERSION = 1


class LedgerUnavailable(StoreUnavailable):
    """The ledger cannot be read or written now; nothing is sent, it is tried again later."""


@dataclass(frozen=True, slots=True)
class Sent:
    """The last notice of one user: sent at ``sent_at``, the next due at ``due_at``."""

    sent_at: float
    due_at: float


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


class FileNoticeLedger(NoticeLedger):
    """One host's ledger: in memory, and in a state file written before memory changes."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._records: dict[str, Sent] = {}
        self._lock = threading.Lock()

    def load(self) -> int:
        """Read the state file; raises StateFileError (StateFileMissing: none yet)."""
        if self._path is None:
            raise StateFileMissing("no notices_path")
        document = read_json_document(self._path, NOTICES_FORMAT, NOTICES_VERSION)
        users = document.get("users")
        if not isinstance(users, dict):
            raise StateFileError("no user table")
        loaded: dict[str, Sent] = {}
        for user, fields in users.items():
            record = _record(user, fields)
            if record is None:
                raise StateFileError(f"malformed record for {user!r:.80}")
            loaded[user] = record
        with self._lock:
            self._records = loaded
        return len(loaded)

    def _write(self, records: dict[str, Sent]) -> None:
        """Save ``records`` then make them the ledger (the caller holds the lock)."""
        if self._path is not None:
            document = {
                "format": NOTICES_FORMAT,
                "version": NOTICES_VERSION,
                "users": {
                    user: {"sent_at": sent.sent_at, "due_at": sent.due_at}
                    for user, sent in records.items()
                },
            }
            try:
                write_json_atomically(self._path, document)
            except StateWriteError as error:
                raise LedgerUnavailable(f"notices not saved: {error.strerror}") from None
        self._records = records

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


def _record(user: object, fields: object) -> Sent | None:
    if not is_valid_user_name(user) or not isinstance(fields, dict):
        return None
    if set(fields) != {"sent_at", "due_at"}:
        return None
    values = [fields["sent_at"], fields["due_at"]]
    if not all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
        for v in values
    ):
        return None
    return Sent(float(values[0]), float(values[1]))


class RedisNoticeLedger(NoticeLedger):
    """Every host's ledger: a key per user, ``PREFIX notice:USER``, that expires when due.

    Its value is ``SENT_AT DUE_AT``. Commands: SET (NX PX), MGET, DEL.
    """

    def __init__(self, client: redis.Redis, key_prefix: str) -> None:
        self._client = client
        self._prefix = f"{key_prefix}notice:"

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
