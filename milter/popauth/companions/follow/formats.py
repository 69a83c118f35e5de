"""One small parser per POP/IMAP server: which log messages are successful logins.

A parser sees the message of a log entry whose program is one of its
``programs`` and answers the client address and user of a *successful*
login, or nothing. Failed logins (``LOGIN FAILED``, ``badlogin:``,
``auth failed``, ``authentication failed``) never match: each pattern spells
the success message whole (``fullmatch``), from its first word on.

The server copies the user name into the line as the client typed it, so a
user name may hold text that looks like the rest of a login line
(``user=x, ip=[203.0.113.9]``). The patterns take the address from the
server's own fixed text: the last ``ip=[...]`` of a Courier line (the server
writes it after the user name), the first ``[...]`` of a Cyrus line (before
it), and so on; and a user name that holds blanks, brackets, angle brackets,
quotes, commas or ``=`` is refused outright, whatever the format.

Servers that log the address and the user in two lines of one process
(popa3d: ``Session from IP`` then ``Authentication passed for USER``) are
matched by pid. A pid is only a name the kernel hands out again once its
process has ended, so a remembered session ends with the first other line of
its pid (popa3d logs ``Didn't attempt authentication`` or ``Authentication
failed`` when a session ends without a login), and after the server's own
login timeout; and the success line, which popa3d logs after becoming the
user, counts from that user's uid only when the uid is a mail account's.
"""

from __future__ import annotations

import pwd
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from popauth.basics.addresses import AddressError, IPAddress, parse_client_address
from popauth.basics.errors import ConfigError
from popauth.companions.follow.entries import LogEntry

MAX_USER = 256
_USER_OK = re.compile(r"[^\s\[\]<>\"'`,=;()]{1," + str(MAX_USER) + "}").fullmatch
# Sessions whose login line has not come yet, per format instance.
MAX_PENDING_SESSIONS = 10_000
# popa3d's POP_TIMEOUT (params.h; Debian's build keeps it): an idle session
# is closed after 10 minutes, so a session line older than that whose pid
# logged nothing since belongs to a process that is gone.
DEFAULT_SESSION_TIMEOUT = 600.0
# Debian's uids for normal (human) accounts: adduser's FIRST_UID..LAST_UID.
DEFAULT_MAIL_UIDS = range(1000, 60_000)
# The overflow uid: what an unmapped uid shows as; never a mail account.
NOBODY_UID = 65_534
# pam_syslog's prefix: "pam_unix(popa3d:auth): ...".
_PAM_MODULE_LINE = re.compile(r"pam_[A-Za-z0-9_]+\([^()\s]*\): ").match


@dataclass(frozen=True, slots=True)
class Login:
    address: IPAddress
    user: str
    time: float


@dataclass(frozen=True, slots=True)
class Refused:
    """A login line that must not count: why (a ``follow_refused`` reason) and details."""

    reason: str
    details: Mapping[str, object]


class FormatError(ConfigError):
    """A format cannot be built from the settings; the message says why."""


def _login(entry: LogEntry, address_text: str, user: str) -> Login | None:
    if not _USER_OK(user):
        return None
    if address_text[:7].lower() == "::ffff:" and "." in address_text:
        # IPv4-mapped, as Courier writes every IPv4 client: the plain IPv4
        # address takes the fast path (the result is the same).
        address_text = address_text[7:]
    try:
        address = parse_client_address(address_text)
    except AddressError:
        return None
    return Login(address, user, entry.time)


class LoginFormat:
    """A server whose success line holds both the address and the user."""

    def __init__(self, name: str, programs: frozenset[str], pattern: re.Pattern[str]) -> None:
        missing = {"ip", "user"} - set(pattern.groupindex)
        if missing:
            raise FormatError(f"the pattern needs named groups {', '.join(sorted(missing))}")
        self.name = name
        self.programs = programs
        self._match = pattern.fullmatch
        # The uids whose lines count (rsyslog envelope), or None: every line.
        self.trusted_uids: frozenset[int] | None = None

    def sender_refusal(self, entry: LogEntry, login: Login) -> str | None:
        """Why the process that sent the login line may not report it, or None."""
        if self.trusted_uids is None or entry.sender_uid in self.trusted_uids:
            return None
        return "untrusted_sender"

    def login(self, entry: LogEntry) -> Login | Refused | None:
        match = self._match(entry.message)
        if match is None:
            return None
        address = match["ip"] or match.groupdict().get("named_ip") or ""
        return _login(entry, address, match["user"])


class SessionFormat(LoginFormat):
    """A server that logs the address at connect and the user at login, same pid."""

    def __init__(
        self,
        name: str,
        programs: frozenset[str],
        session: re.Pattern[str],
        success: re.Pattern[str],
    ) -> None:
        self.name = name
        self.programs = programs
        self._session = session.fullmatch
        self._success = success.fullmatch
        # pid -> (address, time of the session line), oldest first.
        self._sessions: OrderedDict[int, tuple[str, float]] = OrderedDict()
        self.trusted_uids = None
        # The uids of mail accounts, whose own success lines count.
        self.mail_uids: range = DEFAULT_MAIL_UIDS
        self.session_timeout = DEFAULT_SESSION_TIMEOUT
        # The user database popa3d logs in against (tests give their own).
        self.uid_of: Callable[[str], int | None] = _uid_of

    def sender_refusal(self, entry: LogEntry, login: Login) -> str | None:
        """The session line came from a trusted sender (checked when it was read);
        the success line from one too, or from the uid of the user it names,
        if that is a mail account: popa3d logs it after becoming that user.
        A system account (www-data, nobody) that takes over the pid of a
        stranger's session never logs in to POP3, so its word counts for nothing."""
        if super().sender_refusal(entry, login) is None:
            return None
        uid = entry.sender_uid
        if uid is None or uid != self.uid_of(login.user):
            return "untrusted_sender"
        if uid not in self.mail_uids or uid == NOBODY_UID:
            return "not_a_mail_account"
        return None

    def login(self, entry: LogEntry) -> Login | Refused | None:
        pid = entry.pid
        if pid is None:
            return None
        opened = self._session(entry.message)
        if opened is not None:
            self._sessions.pop(pid, None)
            if self.trusted_uids is not None and entry.sender_uid not in self.trusted_uids:
                return None
            self._forget_expired(entry.time)
            self._sessions[pid] = (opened["ip"], entry.time)
            if len(self._sessions) > MAX_PENDING_SESSIONS:
                self._sessions.popitem(last=False)
            return None
        success = self._success(entry.message)
        if success is None and _PAM_MODULE_LINE(entry.message):
            # PAM modules log from the session's process while it checks the
            # password, with popa3d's tag, whatever the verdict.
            return None
        # One login per session line, and any other line of the pid ends the
        # session: popa3d logs one when a session ends without a login, and
        # a process that is gone leaves its pid to be handed out again.
        session = self._sessions.pop(pid, None)
        if success is None:
            return None
        if session is None:
            return Refused("no_session", {"pid": pid})
        address, opened_at = session
        if entry.time - opened_at > self.session_timeout:
            return Refused("session_expired", {"pid": pid, "age": round(entry.time - opened_at)})
        return _login(entry, address, success["user"])

    def _forget_expired(self, now: float) -> None:
        oldest = now - self.session_timeout
        while self._sessions:
            pid, (_, opened_at) = next(iter(self._sessions.items()))
            if opened_at >= oldest:
                return
            del self._sessions[pid]


def _uid_of(user: str) -> int | None:
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None


_IP = r"(?P<ip>[0-9A-Fa-f:.]{2,60})"


def _formats() -> Mapping[str, LoginFormat]:
    def simple(name: str, programs: str, pattern: str) -> LoginFormat:
        return LoginFormat(name, frozenset(programs.split()), re.compile(pattern))

    return {
        # courierpop3login / imaplogin, through courierlogger:
        # "LOGIN, user=alice, ip=[::ffff:127.0.0.2], port=[40112], protocol=POP3".
        # Greedy user: the ip is the last "ip=[...], port=[...]" on the line.
        "courier": simple(
            "courier",
            "courierpop3login imaplogin courierpop3d courierimapd pop3login",
            r"(?:INFO: )?LOGIN, user=(?P<user>.+), ip=\[" + _IP + r"\], port=\[\d{1,5}\]"
            r"(?:, protocol=[A-Z0-9-]{1,16})?",
        ),
        # Cyrus pop3d/imapd: "login: host [127.0.0.2] alice plaintext User logged in
        # SESSIONID=<...>"; the host name comes from DNS and may be absent.
        "cyrus": simple(
            "cyrus",
            "cyrus/pop3 cyrus/pop3s cyrus/imap cyrus/imaps pop3 pop3s imap imaps pop3d imapd",
            r"login: (?:[^\s\[\]]{1,255} )?\[" + _IP + r"\] (?P<user>[^\s\[\]]+) [^\[\]]*"
            r"User logged in(?: SESSIONID=<[^<>\s]*>)?",
        ),
        # Dovecot's login process, in its own log_path ("pop3-login: Info: Login: ...")
        # or through syslog (tag "dovecot", message "pop3-login: Login: ...").
        "dovecot": simple(
            "dovecot",
            "dovecot pop3-login imap-login",
            r"(?:(?:pop3|imap)-login: )?(?:Info: )?Login: user=<(?P<user>[^<>]*)>, "
            r"method=[A-Za-z0-9-]+, rip=" + _IP + r", lip=[0-9A-Fa-f:.]+(?:, .*)?",
        ),
        # solid-pop3d: "user alice authenticated - 127.0.0.2", or "- host (127.0.0.2)"
        # when the address has a DNS name (the user cut at 40 characters).
        "solid-pop3d": simple(
            "solid-pop3d",
            "solid-pop3d spop3d",
            r"(?:mapped )?user (?P<user>\S{1,40}) authenticated(?: through APOP)? - "
            r"(?:" + _IP + r"|[^\s()]{1,255} \((?P<named_ip>[0-9A-Fa-f:.]{2,60})\))",
        ),
        # Qpopper (popper.8): "(v4.1.0) POP login by user "alice" at (host) 127.0.0.2".
        "qpopper": simple(
            "qpopper",
            "qpopper popper in.qpopper",
            r"\(v[^()\s]{1,40}\) POP login by user \"(?P<user>[^\"\s]+)\" "
            r"at \([^()\s]{0,255}\) " + _IP,
        ),
        # UW ipop3d/imapd: "Login user=alice host=client.example [127.0.0.2] nmsgs=0/0",
        # "Authenticated user=alice host=[127.0.0.2]".
        "uw": simple(
            "uw",
            "ipop3d ipop2d imapd",
            r"(?:Login|Authenticated) user=(?P<user>\S+) host=(?:[^\s\[\]]{1,255} )?"
            r"\[" + _IP + r"\](?: nmsgs=\d+/\d+)?",
        ),
        # popa3d: "Session from 127.0.0.2", then "Authentication passed for alice".
        "popa3d": SessionFormat(
            "popa3d",
            frozenset({"popa3d"}),
            re.compile(r"Session from " + _IP),
            re.compile(r"Authentication passed for (?P<user>\S+)"),
        ),
    }


FORMAT_NAMES = (*_formats(), "regex")


def build_format(name: str, programs: tuple[str, ...] = (), regex: str = "") -> LoginFormat:
    """The parser for ``follow_format``; ``programs`` replaces its program names."""
    if name == "regex":
        if not regex:
            raise FormatError('follow_format = "regex" needs follow_regex')
        if not programs:
            raise FormatError('follow_format = "regex" needs follow_programs')
        try:
            pattern = re.compile(regex)
        except re.error as error:
            raise FormatError(f"follow_regex does not compile: {error}") from None
        return LoginFormat("regex", frozenset(programs), pattern)
    formats = _formats()
    if name not in formats:
        raise FormatError(f"unknown format {name!r}; use one of {', '.join(FORMAT_NAMES)}")
    chosen = formats[name]
    if programs:
        chosen.programs = frozenset(programs)
    return chosen
