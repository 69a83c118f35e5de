"""Each server's login line is accepted; failures and look-alikes never are."""

from __future__ import annotations

import pytest

from popauth.basics.addresses import parse_client_address
from popauth.companions.follow.entries import EntryError, EntryParser, LogEntry
from popauth.companions.follow.formats import (
    FORMAT_NAMES,
    FormatError,
    Login,
    Refused,
    SessionFormat,
    build_format,
)
from popauth.config import FOLLOW_FORMATS, FollowTrust

NOW = 1_800_000_000.0

ACCEPTED = [
    (
        "courier",
        "courierpop3login",
        "LOGIN, user=alice, ip=[::ffff:127.0.0.2], port=[40112], protocol=POP3",
        "127.0.0.2",
        "alice",
    ),
    ("courier", "imaplogin", "LOGIN, user=bob, ip=[2001:db8::7], port=[1]", "2001:db8::7", "bob"),
    (
        "cyrus",
        "cyrus/pop3",
        "login: localhost [127.0.0.2] alice plaintext User logged in SESSIONID=<cyrus-1-2-3>",
        "127.0.0.2",
        "alice",
    ),
    (
        "cyrus",
        "cyrus/imap",
        "login: [198.51.100.7] carol PLAIN+TLS User logged in SESSIONID=<x>",
        "198.51.100.7",
        "carol",
    ),
    (
        "dovecot",
        "pop3-login",
        "Info: Login: user=<alice>, method=PLAIN, rip=127.0.0.2, lip=127.0.0.1, mpid=42, "
        "session=<abc>",
        "127.0.0.2",
        "alice",
    ),
    (
        "dovecot",
        "dovecot",
        "imap-login: Login: user=<a@example.org>, method=PLAIN, rip=2001:db8::1, lip=::1, "
        "mpid=7, TLS, session=<x>",
        "2001:db8::1",
        "a@example.org",
    ),
    ("solid-pop3d", "solid-pop3d", "user alice authenticated - 127.0.0.2", "127.0.0.2", "alice"),
    (
        "solid-pop3d",
        "solid-pop3d",
        "user alice authenticated - localhost (127.0.0.1)",
        "127.0.0.1",
        "alice",
    ),
    (
        "qpopper",
        "qpopper",
        '(v4.1.0) POP login by user "alice" at (client.example) 198.51.100.7',
        "198.51.100.7",
        "alice",
    ),
    (
        "uw",
        "ipop3d",
        "Login user=alice host=client.example [198.51.100.7] nmsgs=3/3",
        "198.51.100.7",
        "alice",
    ),
    ("uw", "imapd", "Authenticated user=bob host=[198.51.100.8]", "198.51.100.8", "bob"),
]

REFUSED = [
    ("courier", "courierpop3login", "LOGIN FAILED, user=alice, ip=[::ffff:127.0.0.2]"),
    # A user name that carries its own ip=[...]: refused whole, neither address counts.
    (
        "courier",
        "courierpop3login",
        "LOGIN, user=x, ip=[203.0.113.9], port=[1], ip=[::ffff:127.0.0.2], port=[5]",
    ),
    ("courier", "courierpop3login", "DEBUG: Connection, ip=[::ffff:127.0.0.2], port=[4]"),
    ("cyrus", "cyrus/pop3", "badlogin: localhost [127.0.0.2] plaintext alice SASL(-13): x"),
    (
        "cyrus",
        "cyrus/pop3",
        "login: evil [203.0.113.9] [127.0.0.2] alice plaintext User logged in SESSIONID=<x>",
    ),
    (
        "dovecot",
        "pop3-login",
        "Info: Disconnected (auth failed, 1 attempts in 2 secs): user=<alice>, method=PLAIN, "
        "rip=127.0.0.2, lip=127.0.0.1, session=<x>",
    ),
    (
        "dovecot",
        "pop3-login",
        "Info: Login: user=<x>, rip=203.0.113.9>, method=PLAIN, rip=127.0.0.2, lip=127.0.0.1",
    ),
    ("solid-pop3d", "solid-pop3d", "authentication failed for user alice - 127.0.0.2"),
    ("solid-pop3d", "solid-pop3d", "user alice authenticated - client.example"),
    ("solid-pop3d", "solid-pop3d", "user alice authenticated - a (b) (127.0.0.1)"),
    ("qpopper", "qpopper", '(v4.1.0) POP login by user "x at (y) 1.2.3.4" at (h) 127.0.0.2'),
    ("uw", "ipop3d", "Login failed user=alice auth=alice host=h [198.51.100.7]"),
    ("uw", "ipop3d", "Login user=alice host=a [203.0.113.9] [198.51.100.7] nmsgs=0/0"),
]


def entry(program: str, message: str, pid: int | None = 100) -> LogEntry:
    return LogEntry(time=NOW, program=program, message=message, pid=pid)


@pytest.mark.parametrize(("name", "program", "message", "address", "user"), ACCEPTED)
def test_successful_logins_are_accepted(
    name: str, program: str, message: str, address: str, user: str
) -> None:
    login_format = build_format(name)
    assert program in login_format.programs
    login = login_format.login(entry(program, message))
    assert isinstance(login, Login)
    assert (login.address, login.user, login.time) == (parse_client_address(address), user, NOW)


@pytest.mark.parametrize(("name", "program", "message"), REFUSED)
def test_failures_and_look_alikes_are_refused(name: str, program: str, message: str) -> None:
    assert build_format(name).login(entry(program, message)) is None


def test_popa3d_pairs_the_session_line_with_the_login_of_the_same_pid() -> None:
    popa3d = build_format("popa3d")
    assert popa3d.login(entry("popa3d", "Session from 127.0.0.2", pid=10)) is None
    assert popa3d.login(entry("popa3d", "Session from 127.0.0.3", pid=11)) is None
    assert popa3d.login(entry("popa3d", "Authentication failed for alice", pid=11)) is None
    login = popa3d.login(entry("popa3d", "Authentication passed for alice", pid=10))
    assert isinstance(login, Login) and str(login.address) == "127.0.0.2"
    # Used up: a second success line of that pid needs its own session line.
    again = popa3d.login(entry("popa3d", "Authentication passed for alice", pid=10))
    assert again == Refused("no_session", {"pid": 10})
    # The failure ended pid 11's session; another pid's session never lends its address.
    for pid in (11, 12):
        refused = popa3d.login(entry("popa3d", "Authentication passed for bob", pid=pid))
        assert refused == Refused("no_session", {"pid": pid})


@pytest.mark.parametrize(
    "ending",
    [
        "Didn't attempt authentication",  # the client left, or timed out
        "Authentication failed for alice",
        "Authentication failed for UNKNOWN USER",
        "pipe: Too many open files",  # any other line of the pid
        "Session from 203.0.113.9",  # a new session line from an untrusted sender
    ],
)
def test_popa3d_forgets_a_session_at_any_other_line_of_its_pid(ending: str) -> None:
    """A stranger connects and leaves: popa3d says so, and the pid that a
    local account later takes over lends it no address (issue 18, defect 2)."""
    popa3d = popa3d_with_users()
    assert popa3d.login(line("Session from 203.0.113.9", 500, ROOT)) is None
    # popa3d logs the ending after dropping to its own account; a session
    # line from anyone else than root is not a session either.
    assert popa3d.login(line(ending, 500, POPA3D)) is None
    forged = popa3d.login(line("Authentication passed for alice", 500, ALICE))
    assert forged == Refused("no_session", {"pid": 500})


def test_popa3d_keeps_a_session_through_the_lines_of_its_pam_modules() -> None:
    popa3d = popa3d_with_users()
    assert popa3d.login(line("Session from 198.51.100.7", 30, ROOT)) is None
    note = "pam_unix(popa3d:account): expired password for user alice (password aged)"
    assert popa3d.login(line(note, 30, ROOT)) is None
    login = popa3d.login(line("Authentication passed for alice", 30, ALICE))
    assert isinstance(login, Login) and str(login.address) == "198.51.100.7"


def test_popa3d_forgets_a_session_after_the_login_timeout() -> None:
    popa3d = popa3d_with_users()
    popa3d.session_timeout = 600
    assert popa3d.login(line("Session from 198.51.100.7", 21, ROOT)) is None
    late = popa3d.login(line("Authentication passed for alice", 21, ALICE, later=601))
    assert late == Refused("session_expired", {"pid": 21, "age": 601})
    assert popa3d.login(line("Session from 198.51.100.8", 22, ROOT)) is None
    in_time = popa3d.login(line("Authentication passed for alice", 22, ALICE, later=599))
    assert isinstance(in_time, Login) and str(in_time.address) == "198.51.100.8"
    # Sessions nobody ended are dropped as newer ones come: memory stays bounded
    # by the timeout, not only by MAX_PENDING_SESSIONS.
    assert popa3d.login(line("Session from 198.51.100.9", 23, ROOT)) is None
    assert popa3d.login(line("Session from 198.51.100.10", 24, ROOT, later=700)) is None
    assert len(popa3d._sessions) == 1


POPA3D_USERS = {"root": 0, "www-data": 33, "alice": 1001, "bob": 1002, "nobody": 65_534}
ROOT, WWW_DATA, ALICE, BOB, NOBODY = POPA3D_USERS.values()
POPA3D = 120  # popa3d's own system account


def popa3d_with_users() -> SessionFormat:
    popa3d = build_format("popa3d")
    assert isinstance(popa3d, SessionFormat)
    popa3d.trusted_uids = frozenset({ROOT})
    popa3d.uid_of = POPA3D_USERS.get
    return popa3d


def line(message: str, pid: int, uid: int, later: float = 0) -> LogEntry:
    return LogEntry(time=NOW + later, program="popa3d", message=message, pid=pid, sender_uid=uid)


def test_regex_format_needs_its_groups_and_programs() -> None:
    custom = build_format("regex", ("vm-pop3d",), r"User (?P<user>\S+) logged in from (?P<ip>\S+)")
    login = custom.login(entry("vm-pop3d", "User alice logged in from 192.0.2.4"))
    assert isinstance(login, Login) and login.user == "alice"
    assert custom.login(entry("vm-pop3d", "User alice logged in from nowhere")) is None
    with pytest.raises(FormatError, match="named groups"):
        build_format("regex", ("x",), r"(?P<ip>\S+)")
    with pytest.raises(FormatError, match="follow_programs"):
        build_format("regex", (), r"(?P<ip>\S+) (?P<user>\S+)")
    with pytest.raises(FormatError, match="unknown format"):
        build_format("sendmail")


def test_the_config_lists_every_format() -> None:
    assert sorted(FORMAT_NAMES) == sorted(FOLLOW_FORMATS)


def test_rsyslog_envelope_carries_the_kernels_sender() -> None:
    parser = EntryParser(FollowTrust.RSYSLOG)
    parsed = parser.parse(
        "2026-11-23T09:45:07.020701+00:00 uid=0 pid=3667 courierpop3login: LOGIN, user=a", NOW
    )
    assert (parsed.program, parsed.sender_uid, parsed.pid) == ("courierpop3login", 0, 3667)
    assert parsed.message == "LOGIN, user=a"
    assert parsed.time == pytest.approx(1_795_427_107.020701)
    # The tag's pid is the sender's claim: it must be the kernel's.
    with pytest.raises(EntryError, match="pid"):
        parser.parse("2026-11-23T09:45:07+00:00 uid=0 pid=3 courierpop3login[1]: LOGIN", NOW)
    # A tag that hides fake fields behind blanks is no tag.
    with pytest.raises(EntryError):
        parser.parse("2026-11-23T09:45:07+00:00 uid=65534 pid=3 vm x uid=0 pid=3 a: b", NOW)
    with pytest.raises(EntryError):
        parser.parse("Nov 23 09:41:23 host courierpop3login: LOGIN", NOW)


def test_plain_envelopes_with_and_without_host() -> None:
    parser = EntryParser(FollowTrust.FILE)
    now = 1_795_427_000.0  # 2026-11-23, a few minutes after the lines
    syslog = parser.parse("Nov 23 09:41:23 mx cyrus/pop3[812]: login: x", now)
    assert (syslog.program, syslog.pid, syslog.message) == ("cyrus/pop3", 812, "login: x")
    dovecot = parser.parse("Nov 23 09:41:24 pop3-login: Info: Login: user=<a>", now)
    assert (dovecot.program, dovecot.pid) == ("pop3-login", None)
    assert dovecot.time - syslog.time == 1
    iso = parser.parse("2026-11-23T09:41:23Z mx popa3d[5]: Session from 127.0.0.2", now)
    assert iso.pid == 5 and iso.sender_uid is None


def test_popa3d_trusts_a_session_from_root_and_a_success_from_a_mail_account_itself() -> None:
    popa3d = popa3d_with_users()

    def judged(user: str, sender: int, pid: int) -> str | None:
        assert popa3d.login(line("Session from 198.51.100.7", pid, ROOT)) is None
        success = line(f"Authentication passed for {user}", pid, sender)
        login = popa3d.login(success)
        assert isinstance(login, Login)
        return popa3d.sender_refusal(success, login)

    # A session line a local user sent is not remembered.
    assert popa3d.login(line("Session from 203.0.113.9", 20, ALICE)) is None
    refused = popa3d.login(line("Authentication passed for alice", 20, ALICE))
    assert refused == Refused("no_session", {"pid": 20})
    # popa3d logs the success after switching to the user: that uid counts,
    # for that user only, and only if it is a mail account's.
    assert judged("alice", ALICE, 21) is None
    assert judged("root", ROOT, 22) is None
    assert judged("bob", ALICE, 23) == "untrusted_sender"
    assert judged("root", ALICE, 24) == "untrusted_sender"
    # A system account that takes over the pid of a stranger's session (the
    # attack of issue 18, defect 2) names itself: it is no mail account.
    assert judged("www-data", WWW_DATA, 25) == "not_a_mail_account"
    assert judged("nobody", NOBODY, 26) == "not_a_mail_account"
    popa3d.mail_uids = range(1000, 70_000)
    assert judged("nobody", NOBODY, 27) == "not_a_mail_account"
