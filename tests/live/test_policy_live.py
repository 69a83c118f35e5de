"""The policy door through a real Postfix (``check_policy_service``).

Postfix's relay restrictions are read from ``contrib/postfix/policy-main.cf``:
a broken contrib file fails here. Every client is a loopback address other
than 127.0.0.1 (which Postfix's ``mynetworks`` permits): POP-first clients
127.0.0.2, strangers 127.0.0.3 and up.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.dovecot import DovecotInstance, pop3_login
from harness.popauth import PopauthServer
from harness.ports import free_port
from harness.postfix import PostfixInstance, contrib_policy_relay_restrictions
from harness.redis import RedisInstance
from harness.smtp import REMOTE, SmtpSession, rcpt_reply
from tests.live.conftest import (
    DISGUISED,
    USERS,
    PopauthFactory,
    ask_by_hand,
    assert_postfix_relay_denied,
    mx_postfix,
)

pytestmark = pytest.mark.live

POP_FIRST = "127.0.0.2"
STRANGER = "127.0.0.3"
DENIED_TEXT = "Relaying denied. Turn on SMTP AUTH"


def policy_path(popauth_dir: Path) -> Path:
    return popauth_dir / "policy.sock"


def ask(path: Path, raw: bytes) -> bytes:
    """One policy request by hand; the reply up to its empty line."""
    return ask_by_hand(path, raw, lambda buffer: buffer if b"\n\n" in buffer else None)


def start_with_policy(
    start_popauth: PopauthFactory, popauth_dir: Path, **overrides: object
) -> PopauthServer:
    server = start_popauth(
        policy_socket=str(policy_path(popauth_dir)), policy_socket_mode="0666", **overrides
    )
    assert ask(policy_path(popauth_dir), b"\n").startswith(b"action=451 4.3.0 ")
    return server


@pytest.fixture(scope="module")
def postfix_policy(
    live_root: Path, popauth_dir: Path, dovecot: DovecotInstance
) -> Iterator[PostfixInstance]:
    with mx_postfix(
        live_root / "postfix-policy",
        dovecot,
        relay_restrictions=contrib_policy_relay_restrictions(policy_path(popauth_dir)),
    ) as instance:
        yield instance


def test_a_stranger_is_refused_and_local_mail_accepted(
    postfix_policy: PostfixInstance, start_popauth: PopauthFactory, popauth_dir: Path
) -> None:
    popauth = start_with_policy(start_popauth, popauth_dir)
    assert_postfix_relay_denied(rcpt_reply(postfix_policy.smtp_port, STRANGER, REMOTE))
    assert rcpt_reply(postfix_policy.smtp_port, STRANGER, "postmaster@local.test") == (
        250,
        "2.1.5 Ok",
    )
    decisions = popauth.events("relay_decision")
    assert [d["reason"] for d in decisions] == ["relay_denied"], decisions


@pytest.mark.parametrize("recipient", DISGUISED)
def test_disguised_relays_are_refused(
    postfix_policy: PostfixInstance,
    start_popauth: PopauthFactory,
    popauth_dir: Path,
    recipient: str,
) -> None:
    start_with_policy(start_popauth, popauth_dir)
    code, text = rcpt_reply(postfix_policy.smtp_port, STRANGER, recipient)
    assert code == 550, (code, text)
    assert "Relaying denied" in text, (code, text)


def test_a_pop_login_relays(
    postfix_policy: PostfixInstance,
    dovecot: DovecotInstance,
    start_popauth: PopauthFactory,
    popauth_dir: Path,
) -> None:
    start_with_policy(start_popauth, popauth_dir)
    assert pop3_login(dovecot.pop3_port, "alice", USERS["alice"], POP_FIRST)
    with SmtpSession(postfix_policy.smtp_port, POP_FIRST) as session:
        assert session.mail("alice@local.test")[0] == 250
        assert session.rcpt(REMOTE) == (250, "2.1.5 Ok")
        assert session.rcpt("friend@elsewhere.example") == (250, "2.1.5 Ok")
        assert session.send_message([REMOTE, "friend@elsewhere.example"])[0] == 250


def test_smtp_auth_relays_without_a_login(
    postfix_policy: PostfixInstance, start_popauth: PopauthFactory, popauth_dir: Path
) -> None:
    popauth = start_with_policy(start_popauth, popauth_dir)
    with SmtpSession(postfix_policy.smtp_port, STRANGER) as session:
        session.login("alice", USERS["alice"])
        assert session.mail("")[0] == 250
        assert session.rcpt(REMOTE) == (250, "2.1.5 Ok")
    reasons = [d["reason"] for d in popauth.events("relay_decision")]
    assert reasons == ["smtp_auth"], reasons


def test_pop_first_sender_own_through_the_policy_door(
    postfix_policy: PostfixInstance,
    dovecot: DovecotInstance,
    start_popauth: PopauthFactory,
    popauth_dir: Path,
) -> None:
    """Two users behind one address, each sending as themselves; anyone else is refused."""
    popauth = start_with_policy(start_popauth, popauth_dir, pop_first_sender="own")
    port = postfix_policy.smtp_port
    assert pop3_login(dovecot.pop3_port, "alice", USERS["alice"], POP_FIRST)
    assert pop3_login(dovecot.pop3_port, "bob", USERS["bob"], POP_FIRST)
    for user in ("alice", "bob"):
        with SmtpSession(port, POP_FIRST) as session:
            assert session.mail(f"{user}@local.test")[0] == 250
            assert session.rcpt(REMOTE) == (250, "2.1.5 Ok"), user
            assert session.send_message([REMOTE])[0] == 250
    # A stranger behind the same address, sending as someone else.
    with SmtpSession(port, POP_FIRST) as session:
        assert session.mail("carol@local.test")[0] == 250
        assert session.rcpt(REMOTE) == (
            550,
            f"5.7.1 <{REMOTE}>: Recipient address rejected: Sender address is not yours:"
            " check your mail (POP/IMAP) with the account that owns it, or turn on SMTP AUTH.",
        )
        assert session.rcpt("bob@local.test")[0] == 250  # local mail from anyone
    with SmtpSession(port, POP_FIRST) as session:
        assert session.mail("")[0] == 250  # MAIL FROM:<>
        assert session.rcpt(REMOTE) == (
            550,
            f"5.7.1 <{REMOTE}>: Recipient address rejected: A null sender (<>) may not relay"
            " by a POP/IMAP login: turn on SMTP AUTH.",
        )
    reasons = [d["reason"] for d in popauth.events("relay_decision")]
    assert "sender_not_owned" in reasons
    assert "null_sender" in reasons
    # One user's revoke leaves the other's relaying intact, as themselves only.
    assert popauth.cli("revoke", "--user", "bob").returncode == 0
    with SmtpSession(port, POP_FIRST) as session:
        assert session.mail("alice@local.test")[0] == 250
        assert session.rcpt(REMOTE) == (250, "2.1.5 Ok")
        assert session.rset()[0] == 250
        assert session.mail("bob@local.test")[0] == 250
        code, text = session.rcpt(REMOTE)
        assert code == 550
        assert "Sender address is not yours" in text, text
    # SMTP AUTH is never asked whose sender it is.
    with SmtpSession(port, STRANGER) as session:
        session.login("bob", USERS["bob"])
        assert session.mail("")[0] == 250
        assert session.rcpt(REMOTE) == (250, "2.1.5 Ok")


def test_a_spent_relay_budget_is_451_through_the_policy_door(
    postfix_policy: PostfixInstance,
    dovecot: DovecotInstance,
    start_popauth: PopauthFactory,
    popauth_dir: Path,
) -> None:
    """The door judges through the gate: the budget counts there as through the milter."""
    popauth = start_with_policy(
        start_popauth, popauth_dir, pop_first_max_recipients=2, pop_first_budget_window=60
    )
    assert pop3_login(dovecot.pop3_port, "alice", USERS["alice"], POP_FIRST)
    with SmtpSession(postfix_policy.smtp_port, POP_FIRST) as session:
        assert session.mail("alice@local.test")[0] == 250
        assert session.rcpt(REMOTE)[0] == 250
        assert session.rcpt("bob@local.test")[0] == 250  # local: not counted
        assert session.rcpt("another@remote.example")[0] == 250
        assert session.rcpt("third@remote.example") == (
            451,
            "4.7.1 <third@remote.example>: Recipient address rejected: Too many recipients"
            " for a POP/IMAP login: try again later, or turn on SMTP AUTH.",
        )
        assert session.rcpt("bob@local.test")[0] == 250
    assert len(popauth.events("relay_budget_spent")) == 1
    # SMTP AUTH from the very address is not counted.
    with SmtpSession(postfix_policy.smtp_port, POP_FIRST) as session:
        session.login("bob", USERS["bob"])
        assert session.mail("bob@local.test")[0] == 250
        assert session.rcpt(REMOTE)[0] == 250


def test_popauth_stopped_means_4xx_never_a_relay(
    postfix_policy: PostfixInstance,
    dovecot: DovecotInstance,
    start_popauth: PopauthFactory,
    popauth_dir: Path,
) -> None:
    popauth = start_with_policy(start_popauth, popauth_dir)
    assert pop3_login(dovecot.pop3_port, "alice", USERS["alice"], POP_FIRST)
    assert rcpt_reply(postfix_policy.smtp_port, POP_FIRST, REMOTE)[0] == 250
    assert popauth.stop() == 0
    assert not policy_path(popauth_dir).exists()
    for client in (POP_FIRST, STRANGER):
        assert rcpt_reply(postfix_policy.smtp_port, client, REMOTE) == (
            451,
            f"4.3.5 <{REMOTE}>: Recipient address rejected: Server configuration problem",
        )
    # Mail to local domains never waits on popauth.
    assert rcpt_reply(postfix_policy.smtp_port, STRANGER, "postmaster@local.test")[0] == 250


def test_a_socket_nobody_serves_means_4xx(
    postfix_policy: PostfixInstance, start_popauth: PopauthFactory, popauth_dir: Path
) -> None:
    popauth = start_with_policy(start_popauth, popauth_dir)
    assert popauth.stop() == 0
    # A socket left behind, with no one listening: connections are refused.
    path = policy_path(popauth_dir)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    try:
        assert rcpt_reply(postfix_policy.smtp_port, STRANGER, REMOTE)[0] == 451
    finally:
        path.unlink()


def test_the_door_keeps_serving_postfix_after_bad_clients(
    postfix_policy: PostfixInstance, start_popauth: PopauthFactory, popauth_dir: Path
) -> None:
    popauth = start_with_policy(start_popauth, popauth_dir)
    path = policy_path(popauth_dir)
    for raw in (b"garbage\n\n", b"request=smtpd_access_policy\nx_new=1\n\n"):
        assert ask(path, raw).startswith(b"action=451 4.3.0 Relay check failed")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as hangs_up:
        hangs_up.connect(str(path))
        hangs_up.sendall(b"request=smtpd_access_policy\nprotocol_state=RC")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as too_long:
        too_long.settimeout(5)
        too_long.connect(str(path))
        too_long.sendall(b"helo_name=" + b"x" * 20_000)
        assert too_long.recv(4096).startswith(b"action=451 4.3.0 ")
    assert_postfix_relay_denied(rcpt_reply(postfix_policy.smtp_port, STRANGER, REMOTE))
    assert "policy_rejected" in [e["event"] for e in popauth.events()]


def test_store_unavailable_means_4xx_never_a_relay(
    postfix_policy: PostfixInstance,
    start_popauth: PopauthFactory,
    popauth_dir: Path,
    tmp_path: Path,
) -> None:
    with RedisInstance(root=tmp_path / "redis", port=free_port()) as redis:
        popauth = start_with_policy(
            start_popauth, popauth_dir, store="redis", redis_url=redis.url, redis_timeout=0.3
        )
        popauth.ask(f"LOGIN {POP_FIRST} alice")
        assert rcpt_reply(postfix_policy.smtp_port, POP_FIRST, REMOTE) == (250, "2.1.5 Ok")
        redis.stop()
        for client in (POP_FIRST, STRANGER):
            assert rcpt_reply(postfix_policy.smtp_port, client, REMOTE) == (
                451,
                f"4.3.0 <{REMOTE}>: Recipient address rejected: Relay check unavailable,"
                " try again later",
            )
        # SMTP AUTH needs no whitelist; local mail never waits on popauth.
        with SmtpSession(postfix_policy.smtp_port, STRANGER) as session:
            session.login("alice", USERS["alice"])
            assert session.mail("")[0] == 250
            assert session.rcpt(REMOTE) == (250, "2.1.5 Ok")
        assert rcpt_reply(postfix_policy.smtp_port, STRANGER, "postmaster@local.test")[0] == 250
    assert "whitelist_unavailable" in {e["event"] for e in popauth.events()}


def test_usage_is_counted_at_rcpt(
    postfix_policy: PostfixInstance, start_popauth: PopauthFactory, popauth_dir: Path
) -> None:
    popauth = start_with_policy(start_popauth, popauth_dir, accounting="recipients")
    popauth.ask(f"LOGIN {POP_FIRST} alice")
    with SmtpSession(postfix_policy.smtp_port, POP_FIRST) as session:
        assert session.mail("alice@local.test")[0] == 250
        for recipient in (REMOTE, "friend@elsewhere.example"):
            assert session.rcpt(recipient) == (250, "2.1.5 Ok")
        assert session.send_message([REMOTE, "friend@elsewhere.example"])[0] == 250
    report = popauth.cli("report")
    assert report.returncode == 0, report
    header, *rows = report.stdout.splitlines()
    # The first columns: the dates further on hold spaces.
    (row,) = [dict(zip(header.split()[:3], line.split()[:3], strict=True)) for line in rows]
    assert row["user"] == "alice"
    # One message, both relayed recipients: counted when Postfix asked.
    assert (row["pop_messages"], row["pop_recipients"]) == ("1", "2"), report.stdout


@pytest.mark.parametrize("accounting", ["messages", "recipients"])
def test_graduation_through_the_policy_door(
    postfix_policy: PostfixInstance,
    dovecot: DovecotInstance,
    start_popauth: PopauthFactory,
    popauth_dir: Path,
    accounting: str,
) -> None:
    """An SMTP AUTH relay through the door graduates its user, whose POP-first
    client is then refused with the graduate's text."""
    graduates = popauth_dir / f"graduates-{accounting}.json"
    popauth = start_with_policy(
        start_popauth,
        popauth_dir,
        pop_first_graduate=True,
        graduates_path=str(graduates),
        accounting=accounting,
    )
    port = postfix_policy.smtp_port
    assert pop3_login(dovecot.pop3_port, "alice", USERS["alice"], POP_FIRST)
    assert rcpt_reply(port, POP_FIRST, REMOTE) == (250, "2.1.5 Ok")
    with SmtpSession(port, STRANGER) as session:
        session.login("alice", USERS["alice"])
        assert session.mail("alice@local.test")[0] == 250
        assert session.rcpt(REMOTE) == (250, "2.1.5 Ok")
    assert popauth.events("pop_first_graduated")[-1]["user"] == "alice"
    code, text = rcpt_reply(port, POP_FIRST, REMOTE)
    assert code == 550
    assert text.startswith(
        f"5.7.1 <{REMOTE}>: Recipient address rejected: Relaying denied. Your mail program"
        " already uses SMTP AUTH"
    ), text
