"""One log line split into its envelope (time, program, pid, sender) and message.

Two envelopes, chosen by ``follow_trust``:

``rsyslog``
    the line rsyslog writes with popauth's template (``contrib/rsyslog/``)::

        2026-11-23T09:45:07.020701+00:00 uid=0 pid=3667 courierpop3login: LOGIN, ...

    The time is when rsyslog *received* the message (``timegenerated``), and
    ``uid``/``pid`` are what the kernel told rsyslog about the sending process
    (SCM_CREDENTIALS, imuxsock's trusted properties): nothing a local user
    can forge with ``logger``. They come before the tag, where no part of the
    message can reach. The pid in the tag (``prog[PID]:``) is the sender's
    own claim; when it is there it must equal the kernel's.

``file``
    a log written by the server itself, or any syslog file, trusted as a
    whole: ``Nov 23 09:41:23 [host] prog[pid]: message`` or the same with an
    RFC 3339 time, as rsyslog, syslog-ng and Dovecot's ``log_path`` write it.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime

from popauth.basics.errors import InputError
from popauth.config import FollowTrust


@dataclass(frozen=True, slots=True)
class LogEntry:
    time: float
    program: str
    message: str
    # The sending process as the kernel reported it (rsyslog envelope only).
    sender_uid: int | None = None
    sender_pid: int | None = None
    # The pid written in the tag: the kernel's in the rsyslog envelope, the
    # process's own claim in a plain file.
    pid: int | None = None


class EntryError(InputError):
    """The line is not in the expected envelope; the message says why."""


_TAG = r"(?P<program>[^\s\[\]:]+)(?:\[(?P<pid>\d{1,10})\])?: ?"
_TRUSTED = re.compile(r"(?P<time>\S+) uid=(?P<uid>\d{1,10}) pid=(?P<spid>\d{1,10}) " + _TAG)
_RFC3339 = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)"
_BSD = r"[A-Z][a-z]{2} [ 0-9]\d \d\d:\d\d:\d\d"
# The host is optional: Dovecot's own log_path has none.
_PLAIN = re.compile(rf"(?P<time>{_RFC3339}|{_BSD}) (?:(?P<host>[^\s:]+) )?" + _TAG)
_MONTH_NAMES = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MONTHS = {name: number for number, name in enumerate(_MONTH_NAMES, 1)}


class TimeParser:
    """Log timestamps to epoch seconds, the last one cached (lines come in bursts)."""

    def __init__(self) -> None:
        self._last: tuple[str, float] = ("", 0.0)

    def __call__(self, text: str, now: float) -> float:
        last_text, last_value = self._last
        if text == last_text:
            return last_value
        value = _rfc3339(text) if text[0].isdigit() else _bsd(text, now)
        self._last = (text, value)
        return value


def _rfc3339(text: str) -> float:
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise EntryError(f"bad timestamp {text!r}") from None


def _bsd(text: str, now: float) -> float:
    """``Nov 23 09:41:23``: local time of a year the line does not say."""
    month = _MONTHS.get(text[:3])
    if month is None:
        raise EntryError(f"bad timestamp {text!r}")
    day, clock = int(text[4:6]), text[7:]
    hours, minutes, seconds = (int(part) for part in clock.split(":"))
    year = time.localtime(now).tm_year
    # A line from December read on the 1st of January is from last year.
    for candidate in (year, year - 1):
        value = time.mktime((candidate, month, day, hours, minutes, seconds, 0, 0, -1))
        if value <= now + 86_400:
            return value
    raise EntryError(f"bad timestamp {text!r}")


class EntryParser:
    """Splits lines of one envelope (``rsyslog`` or ``file``) into LogEntry values."""

    def __init__(self, trust: FollowTrust) -> None:
        self._trusted = trust is FollowTrust.RSYSLOG
        self._pattern = _TRUSTED if self._trusted else _PLAIN
        self._times = TimeParser()

    def parse(self, line: str, now: float) -> LogEntry:
        match = self._pattern.match(line)
        if match is None:
            raise EntryError("not a log line of the expected form")
        tag_pid = match["pid"]
        pid = int(tag_pid) if tag_pid else None
        sender_uid = sender_pid = None
        if self._trusted:
            sender_uid, sender_pid = int(match["uid"]), int(match["spid"])
            if pid is not None and pid != sender_pid:
                raise EntryError(f"tag pid {pid} is not the sender's pid {sender_pid}")
            pid = sender_pid
        return LogEntry(
            time=self._times(match["time"], now),
            program=match["program"],
            message=line[match.end() :],
            sender_uid=sender_uid,
            sender_pid=sender_pid,
            pid=pid,
        )
