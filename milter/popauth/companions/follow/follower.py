"""The follow loop: lines in, trusted fresh logins out to the ingest socket.

The follower is a client of the ingest socket, like the Dovecot hook: each
login becomes ``LOGIN ADDRESS USER`` there, so it takes exactly the path a
hook's login takes (the peer check, the block list, ``ipv6_prefix``, the
usage books, the store, Redis included), and it runs with no more rights
than reading the log and writing to that socket.

A line becomes a login only if all of these hold, checked in this order:

1. it is in the configured envelope (``follow_trust``);
2. its program is one of the format's programs;
3. ``rsyslog`` envelope: its pid is not journald's (below);
4. its message is the format's *successful* login, with a plausible user
   (popa3d: paired with a live session line of the same pid);
5. ``rsyslog`` envelope: the kernel says a process of a trusted user
   (``follow_trusted_users``) sent it, and the tag's pid, if any, is that
   process's (popa3d's success line: or a mail account's, its own);
6. it is fresh: not older than ``follow_max_age`` seconds, and (standard
   input) not stamped before the follower started.

Lines that fail 1, 2 or 4 are other log traffic and pass silently; a line
that fails 3, or passes 4 but fails 5 or 6, or a success line the format
refuses (a popa3d success line without a live session), is logged as
``follow_refused`` with the reason. Which formats may be followed at all on
this host is decided before the first line (``popauth.companions.follow.trust``).
One exception: a line of the format's programs in the rsyslog envelope
whose ``uid=`` and ``pid=`` are empty means that rsyslog does not annotate
(imuxsock's trusted properties are off), so no login can ever count; the
first one is logged as an error that says so.

journald: on a systemd host /dev/log is journald's, which forwards each
message to rsyslog with the sender's credentials. When the sender is gone
by then (a short-lived process, or journald busy), the kernel refuses its
pid, and journald sends its own instead; the uid stays the sender's. So the
pid of such a line says nothing about its sender: the line is refused
(``journald_pid``) before any format sees it (popa3d pairs its two lines
by pid).
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from popauth.basics.errors import StoppedError
from popauth.companions.follow.entries import EntryError, EntryParser
from popauth.companions.follow.formats import (
    DEFAULT_MAIL_UIDS,
    DEFAULT_SESSION_TIMEOUT,
    Login,
    LoginFormat,
    Refused,
    SessionFormat,
)
from popauth.companions.follow.sources import LineSource
from popauth.config import FollowTrust

# Lines stamped up to this long after "now" still count (clock steps, rounding).
FUTURE_SLACK = 5.0
RETRY_DELAY = 1.0
# Lines judged, and LOGINs sent in one write, at a time. A backlog of any
# size then goes out in exchanges that each take a bounded time, far inside
# the socket timeout; one unbounded write of a whole backlog could outlast
# it, and then be sent again whole, forever, on a busy host.
REPORT_BATCH = 500
# rsyslog's template with imuxsock's trusted properties off: $!uid, $!pid empty.
_NO_SENDER = re.compile(r"\S+ uid= pid= (?P<program>[^\s\[\]:]+)").match
# /proc/PID/comm of systemd-journald (the kernel keeps 15 characters).
JOURNALD_COMM = b"systemd-journal"
# Journald pids remembered (a new one after each restart of journald).
_MAX_JOURNALD_PIDS = 16
# Other pids, each for a second.
_MAX_REMEMBERED_PIDS = 4096
_NOT_JOURNALD_FOR = 1.0


class JournaldPids:
    """Whether a pid is systemd-journald's, as /proc says now.

    The question is asked when the line is judged, a moment after rsyslog
    wrote it; journald lives as long as the host, so its pid is still its
    own (a process that names itself ``systemd-journal`` only gets its own
    lines refused). A pid /proc does not show (the sender is gone) is not
    journald's. A "no" is remembered for a second: servers log many lines
    from one process, and a new journald does not take a pid that fast.
    """

    def __init__(self, proc: Path = Path("/proc"), clock: Callable[[], float] = time.monotonic):
        self._proc = str(proc)
        self._clock = clock
        self._known: set[int] = set()
        self._not_until: dict[int, float] = {}

    def __contains__(self, pid: object) -> bool:
        if not isinstance(pid, int):
            return False
        if pid in self._known:
            return True
        now = self._clock()
        if self._not_until.get(pid, 0.0) > now:
            return False
        if self._comm(pid) == JOURNALD_COMM:
            if len(self._known) >= _MAX_JOURNALD_PIDS:
                self._known.clear()
            self._known.add(pid)
            return True
        if len(self._not_until) >= _MAX_REMEMBERED_PIDS:
            self._not_until.clear()
        self._not_until[pid] = now + _NOT_JOURNALD_FOR
        return False

    def _comm(self, pid: int) -> bytes:
        # os.open, not pathlib: this runs for every line of the server's programs.
        try:
            descriptor = os.open(f"{self._proc}/{pid}/comm", os.O_RDONLY)
        except OSError:
            return b""
        try:
            return os.read(descriptor, 64).rstrip(b"\n")
        except OSError:
            return b""
        finally:
            os.close(descriptor)


class FollowError(StoppedError, RuntimeError):
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
        trust: FollowTrust,
        trusted_uids: frozenset[int],
        max_age: float,
        not_before: float,
        log: structlog.typing.FilteringBoundLogger,
        counters: Counters,
        mail_uids: range = DEFAULT_MAIL_UIDS,
        session_timeout: float = DEFAULT_SESSION_TIMEOUT,
        journald: Container[int] | None = None,
    ) -> None:
        self._format = login_format
        if trust is FollowTrust.RSYSLOG:
            login_format.trusted_uids = trusted_uids
        if isinstance(login_format, SessionFormat):
            login_format.mail_uids = mail_uids
            login_format.session_timeout = session_timeout
        self._programs = login_format.programs
        self._entries = EntryParser(trust)
        self._check_sender = trust is FollowTrust.RSYSLOG
        self._max_age = max_age
        self._not_before = not_before
        self._log = log
        self._counters = counters
        self._told_no_sender = False
        self._journald = journald if journald is not None else JournaldPids()

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
                elif self._check_sender and self._unannotated(line):
                    self._no_sender(line)
                continue
            if entry.program not in self._programs:
                continue
            if self._check_sender and entry.sender_pid in self._journald:
                self._refuse("journald_pid", line, sender_uid=entry.sender_uid)
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

    def _unannotated(self, line: str) -> bool:
        """A line of the server's programs without a sender: rsyslog annotates nothing.

        Only the server's own: on a Debian host Postfix's chrooted daemons
        log through a socket of their own that rsyslog does not annotate,
        with the same mail facility.
        """
        bare = _NO_SENDER(line)
        return bare is not None and bare["program"] in self._programs

    def _no_sender(self, line: str) -> None:
        self._counters.refuse("no_sender")
        if self._told_no_sender:
            return
        self._told_no_sender = True
        self._log.error(
            "follow_no_sender",
            line=line[:300],
            problem="rsyslog writes no sender uid: no login in this log can ever count",
            fix=(
                "turn on imuxsock's trusted properties on rsyslog's system socket: "
                'module(load="imuxsock" SysSock.Annotate="on" SysSock.ParseTrusted="on") '
                "(see contrib/rsyslog/popauth-follow.conf), then restart rsyslog"
            ),
        )

    def _refuse(self, reason: str, line: str, **fields: object) -> None:
        self._counters.refuse(reason)
        self._log.warning("follow_refused", reason=reason, line=line[:300], **fields)


class IngestReporter:
    """One kept connection to the ingest socket; a batch of LOGINs pipelined per write."""

    def __init__(
        self, path: str, timeout: float, log: structlog.typing.FilteringBoundLogger
    ) -> None:
        self.path = path
        self._timeout = timeout
        self._log = log
        self._connection: socket.socket | None = None
        self._buffer = b""

    def _connect(self) -> socket.socket:
        if self._connection is None:
            connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            connection.settimeout(self._timeout)
            try:
                connection.connect(self.path)
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
        return self._requests([f"LOGIN {login.address} {login.user}" for login in logins])

    def ping(self) -> str:
        """``PING``'s reply (open to anyone who can connect); OSError if none."""
        return self._requests(["PING"])[0]

    def _requests(self, requests: list[str]) -> list[str]:
        # The ingest server drops idle connections: a kept one may be dead,
        # so a failure on a kept connection is retried once on a new one.
        for attempt in (1, 2):
            fresh = self._connection is None
            try:
                return self._exchange(requests)
            except OSError:
                self.close()
                if fresh or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _exchange(self, requests: list[str]) -> list[str]:
        connection = self._connect()
        connection.sendall("".join(f"{request}\n" for request in requests).encode())
        replies: list[str] = []
        buffer = self._buffer
        while len(replies) < len(requests):
            chunk = connection.recv(65536)
            if not chunk:
                raise ConnectionResetError("the ingest endpoint closed the connection")
            lines = (buffer + chunk).split(b"\n")
            buffer = lines.pop()  # the unterminated rest, b"" after a whole line
            replies += (line.decode("utf-8", "replace") for line in lines)
        self._buffer = buffer
        if len(replies) > len(requests):
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
            self._check_ingest()
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

    def _check_ingest(self) -> None:
        """At start: a socket that shuts this user out stops it now, not at a login."""
        denied = False
        while True:
            try:
                self._reporter.ping()
                return
            except OSError as error:
                denied = self._unreachable(error, denied)
                if not denied:
                    return  # away (popauth not started yet): the logins will wait
            if self.stopping.wait(RETRY_DELAY):
                return

    def _unreachable(self, error: OSError, denied_before: bool) -> bool:
        """Log it; answer whether permission was denied; FollowError if twice in a row."""
        self._log.warning("follow_ingest_unreachable", socket=self._reporter.path, error=str(error))
        denied = isinstance(error, PermissionError)
        if denied and denied_before:
            # The socket's owner, group and mode (or ACL) shut this user out:
            # that lasts until an operator acts. Once could be popauth's
            # restart between its bind and chmod; twice in a row is not.
            raise FollowError(
                f"cannot connect to the ingest socket {self._reporter.path}: "
                f"{error.strerror}; its group, mode or ACL must let this user in "
                "(ingest_socket_group, ingest_socket_mode, ingest_socket_acl_groups)"
            )
        return denied

    def _report(self, logins: list[Login]) -> None:
        """Report until acknowledged: the position is saved only after this returns."""
        pending = logins
        denied = False
        while pending:
            try:
                replies = self._reporter.send(pending)
            except OSError as error:
                denied = self._unreachable(error, denied)
                if self.stopping.wait(RETRY_DELAY):
                    raise FollowError("stopped before the ingest endpoint answered") from None
                # A login that waited past follow_max_age is no longer fresh.
                oldest = self._clock() - self._max_age
                pending = [login for login in pending if login.time >= oldest]
                continue
            denied = False
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
                        f"the ingest socket {self._reporter.path} refuses this user "
                        "(ERR forbidden): add it to ingest_allowed_users"
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
