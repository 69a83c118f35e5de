"""popauth in front of a real Postfix, fed by a real Dovecot running the contrib hook.

What only Postfix does; the scenarios Postfix and Sendmail share run in test_mta_live.py.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from harness.dovecot import DovecotInstance, imap_login, pop3_login
from harness.popauth import PopauthServer
from harness.postfix import PostfixInstance
from harness.smtp import REMOTE, SmtpSession, rcpt_reply
from tests.live.conftest import USERS

pytestmark = pytest.mark.live

LOCAL = "alice@local.test"
RELAYING_DENIED = "5.7.1 Relaying denied."


def assert_relay_denied(reply: tuple[int, str]) -> None:
    code, text = reply
    assert code == 550, reply
    assert text.startswith(RELAYING_DENIED), reply


def test_local_recipient_from_anyone(postfix: PostfixInstance, popauth: PopauthServer) -> None:
    for client in ("127.0.0.2", "127.0.0.3"):
        with SmtpSession(postfix.smtp_port, client) as session:
            assert session.mail()[0] == 250
            assert session.rcpt(LOCAL)[0] == 250
            assert session.rcpt("postmaster")[0] == 250
            assert session.send_message([LOCAL])[0] == 250
    assert {d["reason"] for d in popauth.events("relay_decision")} == {"local_recipient"}


def test_pop_login_whitelists_that_client_only(
    postfix: PostfixInstance, dovecot: DovecotInstance, popauth: PopauthServer
) -> None:
    assert pop3_login(dovecot.pop3_port, "alice", USERS["alice"], "127.0.0.2")
    # The hook is synchronous: the entry exists as soon as the login is done.
    query = popauth.cli("query", "--format", "raw", "127.0.0.2")
    assert query.returncode == 0, query
    assert "user=alice" in query.stdout
    with SmtpSession(postfix.smtp_port, "127.0.0.2") as session:
        assert session.mail()[0] == 250
        assert session.rcpt(REMOTE)[0] == 250
        assert session.rcpt("another@remote.example")[0] == 250
        assert session.send_message([REMOTE])[0] == 250
    assert_relay_denied(rcpt_reply(postfix.smtp_port, "127.0.0.3", REMOTE))
    login = popauth.events("login")[-1]
    assert (login["client_ip"], login["user"]) == ("127.0.0.2", "alice")
    assert login["peer_uid"] != 0  # reported by the hook, running as dovecot
    whitelisted = [d for d in popauth.events("relay_decision") if d["reason"] == "whitelisted"]
    assert whitelisted[-1]["user"] == "alice"


def test_imap_login_whitelists_too(
    postfix: PostfixInstance, dovecot: DovecotInstance, popauth: PopauthServer
) -> None:
    assert imap_login(dovecot.imap_port, "bob", USERS["bob"], "127.0.0.6")  # type: ignore[arg-type]
    assert rcpt_reply(postfix.smtp_port, "127.0.0.6", REMOTE)[0] == 250


def test_failed_pop_login_whitelists_nothing(
    postfix: PostfixInstance, dovecot: DovecotInstance, popauth: PopauthServer
) -> None:
    assert not pop3_login(dovecot.pop3_port, "alice", "wrong password", "127.0.0.4")
    assert popauth.cli("query", "127.0.0.4").returncode == 1
    assert popauth.events("login") == []
    assert_relay_denied(rcpt_reply(postfix.smtp_port, "127.0.0.4", REMOTE))


def test_two_users_behind_one_address_each_keep_it_whitelisted(
    postfix: PostfixInstance, dovecot: DovecotInstance, popauth: PopauthServer
) -> None:
    """Both log in from one NAT address; revoking one leaves the other relaying."""
    assert pop3_login(dovecot.pop3_port, "alice", USERS["alice"], "127.0.0.2")
    assert imap_login(dovecot.imap_port, "bob", USERS["bob"], "127.0.0.2")  # type: ignore[arg-type]
    query = popauth.cli("query", "--format", "raw", "127.0.0.2")
    assert query.returncode == 0, query
    assert "user=bob" in query.stdout
    assert "users=alice,bob" in query.stdout
    listing = popauth.cli("list", "--format", "raw")
    assert [line.split()[:2] for line in listing.stdout.splitlines()[1:]] == [
        ["address=127.0.0.2", "user=alice"],
        ["address=127.0.0.2", "user=bob"],
    ]
    revoke = popauth.cli("revoke", "--user", "bob")
    assert revoke.returncode == 0, revoke
    assert "revoked=1" in revoke.stdout
    # alice's login still whitelists the address.
    with SmtpSession(postfix.smtp_port, "127.0.0.2") as session:
        assert session.mail()[0] == 250
        assert session.rcpt(REMOTE)[0] == 250
        assert session.send_message([REMOTE])[0] == 250
    whitelisted = [d for d in popauth.events("relay_decision") if d["reason"] == "whitelisted"]
    assert whitelisted[-1]["user"] == "alice"
    assert popauth.cli("revoke", "--user", "alice").returncode == 0
    assert_relay_denied(rcpt_reply(postfix.smtp_port, "127.0.0.2", REMOTE))


def test_local_recipient_does_not_open_the_door_for_the_next(
    postfix: PostfixInstance, popauth: PopauthServer
) -> None:
    with SmtpSession(postfix.smtp_port, "127.0.0.3") as session:
        assert session.mail()[0] == 250
        assert session.rcpt(LOCAL)[0] == 250
        assert_relay_denied(session.rcpt(REMOTE))
        assert session.rcpt("bob@local.test")[0] == 250
        assert session.send_message([LOCAL, "bob@local.test"])[0] == 250


@pytest.mark.parametrize("recipient", ["alice@LOCAL.TEST", "alice@local.test.", "postmaster"])
def test_odd_but_local_forms_are_accepted(
    postfix: PostfixInstance, popauth: PopauthServer, recipient: str
) -> None:
    assert rcpt_reply(postfix.smtp_port, "127.0.0.3", recipient)[0] == 250


def test_login_goes_on_when_popauth_is_down(
    dovecot: DovecotInstance, popauth: PopauthServer
) -> None:
    popauth.stop()
    started = time.monotonic()
    assert pop3_login(dovecot.pop3_port, "alice", USERS["alice"], "127.0.0.2")
    assert time.monotonic() - started < 5
    assert "could not record login of alice from 127.0.0.2" in dovecot.log_text()


def test_login_goes_on_when_popauth_hangs(dovecot: DovecotInstance, popauth_dir: Path) -> None:
    # A wedged endpoint: the socket accepts connections but nobody answers.
    wedged = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = popauth_dir / "ingest.sock"
    wedged.bind(str(path))
    path.chmod(0o666)
    wedged.listen(16)
    try:
        started = time.monotonic()
        assert pop3_login(dovecot.pop3_port, "bob", USERS["bob"], "127.0.0.3")
        elapsed = time.monotonic() - started
    finally:
        wedged.close()
        path.unlink()
    # popauth login gives up after its 2 s timeout; the login then carries on.
    assert 1.5 < elapsed < 5, elapsed
