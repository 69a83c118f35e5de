"""The follow loop: lines in, trusted fresh logins out to the ingest socket.

The follower is a client of the ingest socket, like the Dovecot hook: each
login becomes ``LOGIN ADDRESS USER`` there, so it takes exactly the path a
hook's login takes (the peer check, the block list, ``ipv6_prefix``, the
usage books, the store, Redis included), and it runs with no more rights
than reading the log and writing to that socket.

A line becomes a login only if all of these hold, checked in this order:

1. it is in the configured envelope (``follow_trust``);
2. its program is one of the format's programs;
3. its message is the format's *successful* login, with a plausible user
   (popa3d: paired with a live session line of the same pid);
4. ``rsyslog`` envelope: the kernel says a process of a trusted user
   (``follow_trusted_users``) sent it, and the tag's pid, if any, is that
   process's (popa3d's success line: or a mail account's, its own);
5. it is fresh: not older than ``follow_max_age`` seconds, and (standard
   input) not stamped before the follower started.

Lines that fail 1 to 3 are other log traffic and pass silently; a line that
passes 3 but fails 4 or 5, or a success line the format refuses (a popa3d
success line without a live session), is logged as ``follow_refused`` with
the reason. Which formats may be followed at all on this host is decided
before the first line (``popauth.follow.trust``).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import structlog

from popauth.follow.entries import EntryError, EntryParser
from popauth.follow.formats import (
    DEFAULT_MAIL_UIDS,
    DEFAULT_SESSION_TIMEOUT,
    Login,
    LoginFormat,
    Refused,
    SessionFormat,
)
from popauth.follow.sources import LineSource

# Lines stamped up to this long after "now" still count (clock steps, rounding).
FUTURE_SLACK = 5.0
RETRY_DELAY = 1.0
# Lines judged, and LOGINs sent in one write, at a time. A backlog of any
# size then goes out in exchanges that each take a bounded time, far inside
# the socket timeout; one unbounded write of a whole backlog could outlast
# it, and then be sent again whole, forever, on a busy host.
REPORT_BATCH = 500


class FollowError(RuntimeError):
    """The follower cannot go on (the ingest socket refuses it); the message says why."""


@dataclass(slots=True)
class Counters:
    lines: int = 0
    logins: int = 0
    reported: int = 0
    refused: dict[str, int] = field(default_factory=dict)

    def refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1


class LineJudge:
    """Decides, line by line, which lines are trusted, fresh, successful logins."""

    def __init__(
        self,
        *,
        login_format: LoginFormat,
        trust: str,
        trusted_uids: frozenset[int],
        max_age: float,
        not_before: float,
        log: structlog.typing.FilteringBoundLogger,
        counters: Counters,
        mail_uids: range = DEFAULT_MAIL_UIDS,
        session_timeout: float = DEFAULT_SESSION_TIMEOUT,
    ) -> None:
        self._format = login_format
        if trust == "rsyslog":
            login_format.trusted_uids = trusted_uids
        if isinstance(login_format, SessionFormat):
            login_format.mail_uids = mail_uids
            login_format.session_timeout = session_timeout
        self._programs = login_format.programs
        self._entries = EntryParser(trust)
        self._check_sender = trust == "rsyslog"
        self._max_age = max_age
        self._not_before = not_before
        self._log = log
        self._counters = counters

    def logins(self, lines: Iterable[bytes], now: float) -> list[Login]:
        found: list[Login] = []
        for raw in lines:
            self._counters.lines += 1
            line = raw.decode("utf-8", "replace").rstrip("\r")
            try:
                entry = self._entries.parse(line, now)
            except EntryError as error:
                if "pid" in str(error):
                    self._refuse("pid_mismatch", line)
                continue
            if entry.program not in self._programs:
                continue
            login = self._format.login(entry)
            if login is None:
                continue
            self._counters.logins += 1
            if isinstance(login, Refused):
                self._refuse(login.reason, line, **login.details)
                continue
            refusal = self._check_sender and self._format.sender_refusal(entry, login)
            if refusal:
                self._refuse(refusal, line, sender_uid=entry.sender_uid)
                continue
            if login.time < now - self._max_age or login.time < self._not_before:
                self._refuse("stale", line, age=round(now - login.time, 3))
                continue
            if login.time > now + FUTURE_SLACK:
                self._refuse("from_the_future", line)
                continue
            found.append(login)
        return found

    def _refuse(self, reason: str, line: str, **fields: object) -> None:
        self._counters.refuse(reason)
        self._log.warning("follow_refused", reason=reason, line=line[:300], **fields)


class IngestReporter:
    """One kept connection to the ingest socket; a batch of LOGINs pipelined per write."""

    def __init__(
        self, path: str, timeout: float, log: structlog.typing.FilteringBoundLogger
    ) -> None:
        self._path = path
        self._timeout = timeout
        self._log = log
        self._connection: socket.socket | None = None
        self._buffer = b""

    def _connect(self) -> socket.socket:
        if self._connection is None:
            connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            connection.settimeout(self._timeout)
            try:
                connection.connect(self._path)
            except OSError:
                connection.close()
                raise
            self._connection, self._buffer = connection, b""
        return self._connection

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def send(self, logins: list[Login]) -> list[str]:
        """The reply line of each LOGIN, in order; OSError if the socket failed."""
        # The ingest server drops idle connections: a kept one may be dead,
        # so a failure on a kept connection is retried once on a new one.
        for attempt in (1, 2):
            fresh = self._connection is None
            try:
                return self._exchange(logins)
            except OSError:
                self.close()
                if fresh or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _exchange(self, logins: list[Login]) -> list[str]:
        connection = self._connect()
        requests = "".join(f"LOGIN {login.address} {login.user}\n" for login in logins)
        connection.sendall(requests.encode())
        replies: list[str] = []
        buffer = self._buffer
        while len(replies) < len(logins):
            chunk = connection.recv(65536)
            if not chunk:
                raise ConnectionResetError("the ingest endpoint closed the connection")
            lines = (buffer + chunk).split(b"\n")
            buffer = lines.pop()  # the unterminated rest, b"" after a whole line
            replies += (line.decode("utf-8", "replace") for line in lines)
        self._buffer = buffer
        if len(replies) > len(logins):
            raise ConnectionResetError("the ingest endpoint answered more than it was asked")
        return replies


class Follower:
    def __init__(
        self,
        *,
        source: LineSource,
        judge: LineJudge,
        reporter: IngestReporter,
        poll_interval: float,
        max_age: float,
        log: structlog.typing.FilteringBoundLogger,
        counters: Counters,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._source = source
        self._judge = judge
        self._reporter = reporter
        self._poll_interval = poll_interval
        self._max_age = max_age
        self._log = log
        self.counters = counters
        self._clock = clock
        self.stopping = threading.Event()

    def run(self) -> None:
        """Follow until stopped (or standard input ends); the position is saved on the way."""
        try:
            while not self.stopping.is_set():
                lines = self._source.read_lines()
                if lines:
                    for start in range(0, len(lines), REPORT_BATCH):
                        batch = lines[start : start + REPORT_BATCH]
                        logins = self._judge.logins(batch, self._clock())
                        if logins:
                            self._report(logins)
                    self._source.commit()
                elif self._source.exhausted:
                    return
                elif not self._source.waits_for_lines:
                    self.stopping.wait(self._poll_interval)
        finally:
            self._source.commit()
            self._source.close()
            self._reporter.close()
            self._log.info(
                "follow_stop",
                lines=self.counters.lines,
                logins=self.counters.logins,
                reported=self.counters.reported,
                refused=self.counters.refused,
            )

    def _report(self, logins: list[Login]) -> None:
        """Report until acknowledged: the position is saved only after this returns."""
        pending = logins
        while pending:
            try:
                replies = self._reporter.send(pending)
            except OSError as error:
                self._log.warning("follow_ingest_unreachable", error=str(error))
                if self.stopping.wait(RETRY_DELAY):
                    raise FollowError("stopped before the ingest endpoint answered") from None
                # A login that waited past follow_max_age is no longer fresh.
                oldest = self._clock() - self._max_age
                pending = [login for login in pending if login.time >= oldest]
                continue
            retry: list[Login] = []
            for login, reply in zip(pending, replies, strict=True):
                status, _, rest = reply.partition(" ")
                if status == "OK":
                    self.counters.reported += 1
                    self._log.info(
                        "follow_login",
                        client_ip=str(login.address),
                        user=login.user,
                        delay=round(self._clock() - login.time, 3),
                    )
                elif rest.startswith("unavailable") or rest.startswith("busy"):
                    retry.append(login)
                elif rest.startswith("forbidden"):
                    raise FollowError(
                        "the ingest socket refuses this user: add it to ingest_allowed_users"
                    )
                else:
                    self.counters.refuse(rest.split(" ", 1)[0] or "error")
                    self._log.warning(
                        "follow_login_refused",
                        client_ip=str(login.address),
                        user=login.user,
                        reply=reply,
                    )
            pending = retry
            if pending and self.stopping.wait(RETRY_DELAY):
                raise FollowError("stopped while the whitelist store was unavailable")
