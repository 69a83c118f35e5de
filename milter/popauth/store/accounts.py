"""Accounts: the block list, and per-user usage of each way to relay.

The usage ledger answers the phase-out question "who still relies on POP
first?": per user, how many messages (and recipients) were relayed because
of a POP/IMAP login and how many because of SMTP AUTH, and when each was
first and last seen, and how often (and when last) a POP-first relay was
refused because POP-first was retired. It is bounded (least recently active
users drop out first) and saved like the whitelist snapshot.

It also keeps the campaign's weekly trend (:class:`WeeklyTrend`): per ISO
week, how many users relayed by POP first, how many by SMTP AUTH, how many
graduated and how many were sent a notice. Only the current week holds
names (each set at most ``max_users``); a finished week is folded into four
numbers, and at most :data:`TREND_WEEKS` finished weeks are kept.

The file's version stays 1: the refusals (``refusals``) and the trend
(``weeks``) are keys of their own beside ``users``, so that a file written
before them loads (with none), and one written after still loads in a
version that knows nothing of them.

The block list names users whose logins the ingest endpoint refuses. It is
written through on every change: a block must survive any restart. It holds
names in their caseless form (:func:`popauth.basics.usernames.user_key`), so that
blocking ``Alice`` refuses ``alice`` and ``ALICE`` too.
"""

from __future__ import annotations

import abc
import enum
import math
import threading
from collections import deque
from dataclasses import asdict, dataclass, field
from dataclasses import fields as fields_of
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
import structlog
from cachetools import LRUCache

from popauth.basics.clock import Clock
from popauth.basics.errors import StateFileError, StateFileMissing, StateWriteError
from popauth.basics.usernames import is_valid_user_name, user_key
from popauth.store.base import StoreUnavailable
from popauth.store.statefile import read_json_document, write_json_atomically


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
    # POP-first relays refused because POP-first is retired (pop_first_retire_at
    # passed, or pop_first = "off"): messages, and the last one.
    retired_refusals: int = 0
    retired_last_refused: float = 0.0

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


# The fields of a saved user record (the ledger's first version), and of a REPORT line.
USAGE_COUNTS = (
    "pop_messages",
    "pop_recipients",
    "pop_first_seen",
    "pop_last_seen",
    "auth_messages",
    "auth_recipients",
    "auth_first_seen",
    "auth_last_seen",
)


def usage_counts(usage: Usage) -> dict[str, int | float]:
    """The usage as a saved user record has it (the refusals are saved apart)."""
    return {name: getattr(usage, name) for name in USAGE_COUNTS}


USAGE_FORMAT = "popauth-usage"
USAGE_VERSION = 1
# Finished weeks the trend keeps: a year. Each is a week name and four numbers.
TREND_WEEKS = 52


_DAY = 86_400.0


def iso_week(epoch: float) -> str:
    """The ISO 8601 week of ``epoch`` (UTC), e.g. ``2026-W49``."""
    year, week, _ = datetime.fromtimestamp(epoch, UTC).isocalendar()
    return f"{year}-W{week:02d}"


class WeekEvent(enum.Enum):
    """What the weekly trend counts, once per user and week."""

    POP_FIRST = "pop_first"
    SMTP_AUTH = "smtp_auth"
    GRADUATED = "graduated"
    NOTIFIED = "notified"


@dataclass(frozen=True, slots=True)
class Week:
    """One week of the trend: distinct users per :class:`WeekEvent`."""

    week: str
    pop_first: int = 0
    smtp_auth: int = 0
    graduated: int = 0
    notified: int = 0


@dataclass(slots=True)
class WeeklyTrend:
    """The current week's users per event (names: each counted once), and
    the finished weeks as numbers, the newest last, at most ``weeks`` of them.

    Memory: the current week's four sets of at most ``max_users`` names, and
    ``weeks`` small records. A set that is full counts no more names that
    week (a site that size sees the ledger drop users too).
    """

    max_users: int
    weeks: int = TREND_WEEKS
    current: str = ""
    users: dict[WeekEvent, set[str]] = field(default_factory=dict)
    finished: deque[Week] = field(default_factory=deque)
    # The UTC day last noted and its ISO week: every relayed message is
    # noted, and the week only changes at a day's start (ISO weeks begin at
    # Monday 00:00 UTC), so iso_week() runs once a day, not per message.
    _day: float = field(default=-1.0, init=False, repr=False, compare=False)
    _day_week: str = field(default="", init=False, repr=False, compare=False)

    def note(self, event: WeekEvent, user: str, now: float) -> None:
        """The caller holds the ledger's lock."""
        day = now // _DAY
        if day != self._day:
            self._day, self._day_week = day, iso_week(now)
        self.turn_to(self._day_week)
        names = self.users.setdefault(event, set())
        if len(names) < self.max_users:
            names.add(user)

    def turn_to(self, week: str) -> None:
        """Make ``week`` the current one, folding the one before into numbers."""
        if week == self.current:
            return
        if self.current and week > self.current:
            self.finished.append(self._counted())
            while len(self.finished) > self.weeks:
                self.finished.popleft()
        elif self.current:
            return  # the clock went back: keep counting in the newer week
        self.current = week
        self.users = {}

    def _counted(self) -> Week:
        counts = {event.value: len(self.users.get(event, ())) for event in WeekEvent}
        return Week(self.current, **counts)

    def rows(self) -> list[Week]:
        """The finished weeks, then the current one, oldest first."""
        return [*self.finished, *([self._counted()] if self.current else [])]

    def document(self) -> dict[str, Any]:
        return {
            "current": self.current,
            "users": {event.value: sorted(self.users.get(event, ())) for event in WeekEvent},
            "finished": [asdict(week) for week in self.finished],
        }

    def load(self, document: Any) -> None:
        """Take a saved trend; raises StateFileError when it is malformed."""
        if not isinstance(document, dict):
            raise StateFileError("malformed weeks")
        current = document.get("current", "")
        users = document.get("users", {})
        finished = document.get("finished", [])
        if not isinstance(current, str) or not isinstance(users, dict):
            raise StateFileError("malformed weeks")
        if not isinstance(finished, list):
            raise StateFileError("malformed weeks")
        loaded: dict[WeekEvent, set[str]] = {}
        for event in WeekEvent:
            names = users.get(event.value, [])
            if not isinstance(names, list) or not all(is_valid_user_name(n) for n in names):
                raise StateFileError(f"malformed weeks: {event.value}")
            loaded[event] = set(names[: self.max_users])
        weeks = [_week(record) for record in finished]
        if any(week is None for week in weeks):
            raise StateFileError("malformed weeks: a finished week")
        self.current = current
        self.users = loaded
        self.finished = deque(week for week in weeks[-self.weeks :] if week is not None)


def _week(record: Any) -> Week | None:
    if not isinstance(record, dict) or set(record) != {f.name for f in fields_of(Week)}:
        return None
    counts = [record[event.value] for event in WeekEvent]
    if not isinstance(record["week"], str) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts
    ):
        return None
    return Week(**record)


class UsageLedger:
    def __init__(self, *, max_users: int, clock: Clock, trend_weeks: int = TREND_WEEKS) -> None:
        self._clock = clock
        self._users: LRUCache[str, Usage] = LRUCache(maxsize=max_users)
        self._trend = WeeklyTrend(max_users=max_users, weeks=trend_weeks)
        self._lock = threading.Lock()

    def record(self, user: str, way: RelayWay, *, messages: int, recipients: int) -> None:
        if not user:
            return
        now = self._clock.time()
        event = WeekEvent.POP_FIRST if way is RelayWay.POP_FIRST else WeekEvent.SMTP_AUTH
        with self._lock:
            usage = self._users.get(user)
            if usage is None:
                usage = self._users[user] = Usage()
            usage.add(way, messages, recipients, now)
            self._trend.note(event, user, now)

    def record_retired_refusal(self, user: str) -> None:
        """A POP-first relay of ``user`` was refused: POP-first is retired."""
        if not user:
            return
        now = self._clock.time()
        with self._lock:
            usage = self._users.get(user)
            if usage is None:
                usage = self._users[user] = Usage()
            usage.retired_refusals += 1
            usage.retired_last_refused = now

    def note(self, event: WeekEvent, user: str) -> None:
        """For the weekly trend: ``user`` graduated or was sent a notice."""
        if not user:
            return
        now = self._clock.time()
        with self._lock:
            self._trend.note(event, user, now)

    def weeks(self) -> list[Week]:
        """The weekly trend, oldest week first (the current week last)."""
        with self._lock:
            self._trend.turn_to(iso_week(self._clock.time()))
            return self._trend.rows()

    def users(self) -> list[tuple[str, Usage]]:
        """Every user the ledger holds, most recently active first."""
        with self._lock:
            rows = [(user, Usage(**asdict(u))) for user, u in self._users.items()]
        return sorted(rows, key=lambda row: _last_seen(row[1]), reverse=True)

    def pop_first_users_since(self, since: float) -> int:
        """How many users relayed by POP first at or after ``since``."""
        with self._lock:
            return sum(
                1
                for usage in self._users.values()
                if usage.pop_messages and usage.pop_last_seen >= since
            )

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
            users = {user: usage_counts(usage) for user, usage in self._users.items()}
            refusals = {
                user: [usage.retired_refusals, usage.retired_last_refused]
                for user, usage in self._users.items()
                if usage.retired_refusals
            }
            weeks = self._trend.document()
        write_json_atomically(
            path,
            {
                "format": USAGE_FORMAT,
                "version": USAGE_VERSION,
                "users": users,
                "refusals": refusals,
                "weeks": weeks,
            },
        )

    def load(self, path: Path, log: structlog.typing.FilteringBoundLogger | None = None) -> int:
        """Merge a saved ledger; raises StateFileError for a bad file.

        A record that is not a plain user name with finite, non-negative
        numbers is dropped (and logged), never served.
        """
        document = read_json_document(path, USAGE_FORMAT, USAGE_VERSION)
        users = document.get("users")
        if not isinstance(users, dict):
            raise StateFileError("no user table")
        refusals = document.get("refusals", {})
        if not isinstance(refusals, dict):
            raise StateFileError("malformed refusals")
        trend = WeeklyTrend(max_users=self._trend.max_users, weeks=self._trend.weeks)
        if "weeks" in document:
            trend.load(document["weeks"])
        loaded: dict[str, Usage] = {}
        for user, fields in users.items():
            problem = _usage_problem(user, fields)
            if problem is not None:
                if log is not None:
                    log.error(
                        "usage_record_dropped", path=str(path), user=repr(user)[:80], reason=problem
                    )
                continue
            usage = loaded[user] = Usage(**fields)
            refused = _refusals(refusals.get(user))
            if refused is not None:
                usage.retired_refusals, usage.retired_last_refused = refused
        with self._lock:
            # Oldest activity first, so the LRU order matches how recent it is.
            for user, usage in sorted(loaded.items(), key=lambda kv: _last_seen(kv[1])):
                self._users[user] = usage
            if trend.current:
                self._trend = trend
        return len(loaded)


_USAGE_FIELDS = {f.name: f.type for f in fields_of(Usage) if f.name in USAGE_COUNTS}


def _refusals(saved: Any) -> tuple[int, float] | None:
    """A saved ``[count, last]`` of retired refusals, or None (none, or malformed)."""
    if not isinstance(saved, list) or len(saved) != 2:
        return None
    count, last = saved
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        return None
    if isinstance(last, bool) or not isinstance(last, int | float) or not math.isfinite(last):
        return None
    return count, max(0.0, float(last))


def _usage_problem(user: str, fields: Any) -> str | None:
    """Why a saved usage record cannot be used, or None if it can."""
    if not is_valid_user_name(user):
        return "not a valid user name"
    if not isinstance(fields, dict) or set(fields) != set(_USAGE_FIELDS):
        return "malformed"
    for name, value in fields.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"{name} is not a number"
        if not math.isfinite(value) or value < 0:
            return f"{name} is not a finite, non-negative number"
        if _USAGE_FIELDS[name] == "int" and value != int(value):
            return f"{name} is not a whole number"
        fields[name] = int(value) if _USAGE_FIELDS[name] == "int" else float(value)
    return None


def _last_seen(usage: Usage) -> float:
    # A refusal is activity too: a user only refused since the date stays in view.
    return max(usage.pop_last_seen, usage.auth_last_seen, usage.retired_last_refused)


# --- the block list ---------------------------------------------------------


class BlockList(abc.ABC):
    """Blocked users, matched caselessly; :meth:`users` lists their caseless forms."""

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


class BlockListUnwritable(StoreUnavailable):
    """The block list could not be saved; it is unchanged, in memory too."""


class FileBlockList(BlockList):
    """The embedded store's block list, one JSON file rewritten on each change.

    A change is written to disk before it takes effect in memory: if the
    write fails (read-only or full filesystem), :class:`BlockListUnwritable`
    is raised and nothing changed, so a block is never acknowledged and then
    lost at the next restart.

    A damaged file stops popauth at start (StateFileError): starting without
    it would let blocked users relay again. A name that is not a valid user
    name (a blank or a line break in it) is dropped and logged: no login can
    carry such a name, and serving it would break the ``BLOCKED`` framing.
    """

    def __init__(
        self, path: Path | None, log: structlog.typing.FilteringBoundLogger | None = None
    ) -> None:
        self._path = path
        self._users: frozenset[str] = frozenset()
        self._lock = threading.Lock()
        if path is not None:
            try:
                document = read_json_document(path, BLOCK_FORMAT, BLOCK_VERSION)
            except StateFileMissing:
                return
            except StateFileError as problem:
                raise StateFileError(f"block list {path}: {problem}") from None
            users = document.get("users")
            if not isinstance(users, list) or not all(isinstance(u, str) for u in users):
                raise StateFileError(f"block list {path}: malformed user list")
            for user in users:
                if not is_valid_user_name(user) and log is not None:
                    log.error(
                        "blocklist_record_dropped",
                        path=str(path),
                        user=repr(user)[:80],
                        reason="not a valid user name",
                    )
            # A file written before names were kept caseless is folded here.
            self._users = frozenset(user_key(u) for u in users if is_valid_user_name(u))

    def _replace(self, users: frozenset[str]) -> None:
        """Write ``users`` to disk, then make them the block list (caller holds the lock)."""
        if self._path is not None:
            document = {"format": BLOCK_FORMAT, "version": BLOCK_VERSION, "users": sorted(users)}
            try:
                write_json_atomically(self._path, document)
            except StateWriteError as error:
                raise BlockListUnwritable(f"block list not saved: {error.strerror}") from None
        self._users = users

    def add(self, user: str) -> bool:
        key = user_key(user)
        with self._lock:
            if key in self._users:
                return False
            self._replace(self._users | {key})
            return True

    def remove(self, user: str) -> bool:
        key = user_key(user)
        with self._lock:
            if key not in self._users:
                return False
            self._replace(self._users - {key})
            return True

    def __contains__(self, user: object) -> bool:
        # A frozenset replaced whole: readers need no lock.
        return isinstance(user, str) and user_key(user) in self._users

    def users(self) -> list[str]:
        return sorted(self._users)


class RedisBlockList(BlockList):
    """The block list of a Redis-backed site: one set, shared by every host.

    Its key is the store's (``RedisStore.blocklist_key``): the store checks
    it in the same script that writes a login. A member that is not in
    caseless form was written before names were kept so: it still refuses
    its own spelling, until an unblock of that spelling removes it.
    """

    def __init__(self, client: redis.Redis, key: str) -> None:
        self._client = client
        self._key = key

    def _call(self, method: str, *args: str) -> Any:
        try:
            return getattr(self._client, method)(self._key, *args)
        except redis.RedisError as error:
            raise StoreUnavailable(f"redis: {error}") from error

    def add(self, user: str) -> bool:
        return bool(self._call("sadd", user_key(user)))

    def remove(self, user: str) -> bool:
        return bool(self._call("srem", *{user_key(user), user}))

    def __contains__(self, user: object) -> bool:
        if not isinstance(user, str):
            return False
        found = self._call("smismember", *dict.fromkeys((user_key(user), user)))
        return any(found)

    def users(self) -> list[str]:
        members = self._call("smembers")
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)


# --- graduates: users who moved on to SMTP AUTH ----------------------------


@dataclass(frozen=True, slots=True)
class Graduation:
    """When a user was first seen relaying by SMTP AUTH (``pop_first_graduate``),
    and when an operator reinstated their POP-first (0: not).

    A reinstated user does not graduate again: the operator has seen that
    one of their mail programs still needs POP-first.
    """

    graduated_at: float
    reinstated_at: float = 0.0

    @property
    def graduated(self) -> bool:
        return not self.reinstated_at


class GraduatesUnwritable(StoreUnavailable):
    """A graduation or reinstatement could not be saved; nothing changed."""


class Graduates(abc.ABC):
    """Graduations by caseless user name (:func:`user_key`), shared by every
    host of a Redis site. Names are matched caselessly: the SMTP AUTH name
    and the POP/IMAP login may differ in case, and a match errs on refusing."""

    @abc.abstractmethod
    def graduate(self, user: str, now: float) -> bool:
        """Record ``user``'s graduation; False if they already have a record."""

    @abc.abstractmethod
    def reinstate(self, user: str, now: float) -> Graduation | None:
        """Undo ``user``'s graduation; None if they are not graduated."""

    @abc.abstractmethod
    def graduated_among(self, users: tuple[str, ...]) -> frozenset[str]:
        """Those of ``users`` (as given) who are graduated; StoreUnavailable if unknown."""

    @abc.abstractmethod
    def records(self) -> dict[str, Graduation]: ...


GRADUATES_FORMAT = "popauth-graduates"
GRADUATES_VERSION = 1


class FileGraduates(Graduates):
    """The embedded store's graduates: one JSON file, written before memory
    changes, so that a reinstatement is never acknowledged and then lost."""

    def __init__(
        self, path: Path | None, log: structlog.typing.FilteringBoundLogger | None = None
    ) -> None:
        self._path = path
        self._records: dict[str, Graduation] = {}
        self._lock = threading.Lock()
        if path is None:
            return
        try:
            document = read_json_document(path, GRADUATES_FORMAT, GRADUATES_VERSION)
        except StateFileMissing:
            return
        except StateFileError as problem:
            raise StateFileError(f"graduates {path}: {problem}") from None
        users = document.get("users")
        if not isinstance(users, dict):
            raise StateFileError(f"graduates {path}: malformed user table")
        for user, fields in users.items():
            record = _graduation(user, fields)
            if record is None:
                if log is not None:
                    log.error(
                        "graduate_record_dropped",
                        path=str(path),
                        user=repr(user)[:80],
                        reason="malformed",
                    )
                continue
            self._records[user] = record

    def _replace(self, records: dict[str, Graduation]) -> None:
        """Write ``records``, then make them the graduates (caller holds the lock)."""
        if self._path is not None:
            document = {
                "format": GRADUATES_FORMAT,
                "version": GRADUATES_VERSION,
                "users": {user: asdict(record) for user, record in sorted(records.items())},
            }
            try:
                write_json_atomically(self._path, document)
            except StateWriteError as error:
                raise GraduatesUnwritable(f"graduates not saved: {error.strerror}") from None
        self._records = records

    def graduate(self, user: str, now: float) -> bool:
        key = user_key(user)
        with self._lock:
            if key in self._records:
                return False
            self._replace({**self._records, key: Graduation(now)})
            return True

    def reinstate(self, user: str, now: float) -> Graduation | None:
        key = user_key(user)
        with self._lock:
            record = self._records.get(key)
            if record is None or not record.graduated:
                return None
            self._replace({**self._records, key: Graduation(record.graduated_at, now)})
            return record

    def graduated_among(self, users: tuple[str, ...]) -> frozenset[str]:
        # A dict replaced whole: readers need no lock.
        records = self._records
        return frozenset(
            user for user in users if (r := records.get(user_key(user))) is not None and r.graduated
        )

    def records(self) -> dict[str, Graduation]:
        return dict(self._records)


def _graduation(user: Any, fields: Any) -> Graduation | None:
    if not isinstance(user, str) or not is_valid_user_name(user) or not isinstance(fields, dict):
        return None
    if set(fields) != {"graduated_at", "reinstated_at"}:
        return None
    values = list(fields.values())
    if not all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
        for v in values
    ):
        return None
    return Graduation(float(fields["graduated_at"]), float(fields["reinstated_at"]))


# HGET, and HSET with the reinstatement time only if still graduated: one
# step, so that two hosts reinstating at once answer OK once.
_REINSTATE_SCRIPT = """
local record = redis.call('HGET', KEYS[1], ARGV[1])
if not record then return false end
local graduated, reinstated = string.match(record, '^(%S+) (%S+)$')
if not graduated or reinstated ~= '0' then return false end
redis.call('HSET', KEYS[1], ARGV[1], graduated .. ' ' .. ARGV[2])
return graduated
"""


class RedisGraduates(Graduates):
    """A Redis site's graduates: one hash, user key -> "graduated reinstated"."""

    def __init__(self, client: redis.Redis, key: str) -> None:
        self._client = client
        self._key = key
        self._reinstate = client.register_script(_REINSTATE_SCRIPT)

    def graduate(self, user: str, now: float) -> bool:
        try:
            return bool(self._client.hsetnx(self._key, user_key(user), f"{now:.3f} 0"))
        except redis.RedisError as error:
            raise GraduatesUnwritable(f"redis: {error}") from error

    def reinstate(self, user: str, now: float) -> Graduation | None:
        try:
            graduated = self._reinstate(keys=[self._key], args=[user_key(user), f"{now:.3f}"])
        except redis.RedisError as error:
            raise GraduatesUnwritable(f"redis: {error}") from error
        if graduated is None:
            return None
        return Graduation(float(graduated))

    def graduated_among(self, users: tuple[str, ...]) -> frozenset[str]:
        if not users:
            return frozenset()
        try:
            values = self._client.hmget(self._key, [user_key(user) for user in users])
        except redis.RedisError as error:
            raise StoreUnavailable(f"redis: {error}") from error
        return frozenset(
            user
            for user, value in zip(users, values, strict=True)
            if value is not None and (r := _parsed(value)) is not None and r.graduated
        )

    def records(self) -> dict[str, Graduation]:
        try:
            found = self._client.hgetall(self._key)
        except redis.RedisError as error:
            raise StoreUnavailable(f"redis: {error}") from error
        records = {}
        for user, value in found.items():
            record = _parsed(value)
            if record is not None:
                name = user.decode() if isinstance(user, bytes) else str(user)
                records[name] = record
        return records


def _parsed(value: bytes | str) -> Graduation | None:
    text = value.decode() if isinstance(value, bytes) else value
    try:
        graduated, reinstated = (float(word) for word in text.split())
    except ValueError:
        return None
    return Graduation(graduated, reinstated)
