"""The same scenarios through a real Postfix and a real Sendmail, both in front of popauth.

The ``mta`` fixture runs each test once per MTA and carries what differs
between them: the reply texts, ``{rcpt_mailer}``'s word for outbound mail,
a local recipient the MTA itself accepts, how a client logs in (Postfix:
a POP3 login through the real Dovecot and the contrib hook; Sendmail:
``popauth login``, the hook's client) and the SMTP AUTH account (Dovecot
SASL; Sendmail's sasldb). What only one MTA does stays in
test_postfix_live.py and test_sendmail_live.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from harness.dovecot import DovecotInstance, pop3_login
from harness.popauth import PopauthServer
from harness.postfix import PostfixInstance
from harness.sendmail import SendmailInstance
from harness.smtp import REMOTE, SmtpSession, rcpt_reply
from tests.live.conftest import SENDMAIL_SASL_USERS, USERS, PopauthFactory

Login = Callable[[PopauthServer, str, str], None]


@dataclass(frozen=True)
class Mta:
    """One MTA in front of popauth, and what its replies and words are."""

    name: str
    smtp_port: int
    # {rcpt_mailer} for a recipient the MTA would send out: a real relay.
    outbound_mailer: str
    # A recipient the MTA delivers itself (Sendmail checks the user exists).
    local_recipient: str
    # The reply to MAIL FROM while popauth is stopped (fail closed: 4xx).
    tempfail_at_mail: tuple[int, str]
    # How popauth's refusal begins, and what it contains, as the MTA passes it on.
    denied_prefix: str
    denied_text: str
    # An account SMTP AUTH accepts.
    sasl_user: tuple[str, str]
    # Log ``user`` in from ``client`` (the login must succeed).
    login: Login

    def assert_relay_denied(self, reply: tuple[int, str]) -> None:
        code, text = reply
        assert code == 550, reply
        assert text.startswith(self.denied_prefix), reply
        assert self.denied_text in text, reply


def postfix_mta(postfix: PostfixInstance, dovecot: DovecotInstance) -> Mta:
    def login(popauth: PopauthServer, client: str, user: str) -> None:
        assert pop3_login(dovecot.pop3_port, user, USERS[user], client)

    return Mta(
        name="postfix",
        smtp_port=postfix.smtp_port,
        outbound_mailer="smtp",
        local_recipient="alice@local.test",
        # What README.rst says a stopped popauth gives, with contrib's
        # milter_default_action (tempfail): the greeting and EHLO as usual,
        # then 451 at MAIL FROM, on Postfix 3.7 and 3.10 alike (3.10's own
        # default would be 421 at connect).
        tempfail_at_mail=(451, "4.7.1 Service unavailable - try again later"),
        denied_prefix="5.7.1 Relaying denied.",
        denied_text="Relaying denied.",
        sasl_user=("bob", USERS["bob"]),
        login=login,
    )


def sendmail_mta(sendmail: SendmailInstance) -> Mta:
    def login(popauth: PopauthServer, client: str, user: str) -> None:
        result = popauth.cli("login", client, user)
        assert result.returncode == 0, result

    return Mta(
        name="sendmail",
        smtp_port=sendmail.smtp_port,
        outbound_mailer="esmtp",
        # root (passwd) exists on every Debian system.
        local_recipient="root@local.test",
        # F=T: Sendmail cannot reach the filter and refuses the transaction.
        tempfail_at_mail=(451, "4.3.2 Please try again later"),
        # popauth answers "550 5.7.1 Relaying denied. <text>"; Sendmail puts the
        # recipient between the status code and the text.
        denied_prefix="5.7.1 <",
        denied_text="... Relaying denied. Turn on SMTP AUTH",
        sasl_user=("carol", SENDMAIL_SASL_USERS["carol"]),
        login=login,
    )


MTAS = ("postfix", "sendmail")


@pytest.fixture(params=MTAS)
def mta(request: pytest.FixtureRequest) -> Mta:
    if request.param == "postfix":
        return postfix_mta(request.getfixturevalue("postfix"), request.getfixturevalue("dovecot"))
    return sendmail_mta(request.getfixturevalue("sendmail"))


def test_remote_recipient_before_any_login(mta: Mta, popauth: PopauthServer) -> None:
    reply = rcpt_reply(mta.smtp_port, "127.0.0.2", REMOTE)
    mta.assert_relay_denied(reply)
    assert "SMTP AUTH" in reply[1]  # the default explanation reaches the client
    decision = popauth.events("relay_decision")[-1]
    assert decision["client_ip"] == "127.0.0.2"
    assert decision["rcpt_mailer"] == mta.outbound_mailer
    assert decision["reason"] == "relay_denied"


def test_revoke(mta: Mta, popauth: PopauthServer) -> None:
    mta.login(popauth, "127.0.0.2", "alice")
    with SmtpSession(mta.smtp_port, "127.0.0.2") as session:
        assert session.mail()[0] == 250
        assert session.rcpt(REMOTE)[0] == 250
        assert session.rset()[0] == 250
        revoke = popauth.cli("revoke", "127.0.0.2")
        assert revoke.returncode == 0, revoke
        # The next message of the very same session is checked again.
        assert session.mail()[0] == 250
        mta.assert_relay_denied(session.rcpt(REMOTE))
    mta.assert_relay_denied(rcpt_reply(mta.smtp_port, "127.0.0.2", REMOTE))


def test_expiry(mta: Mta, start_popauth: PopauthFactory) -> None:
    popauth = start_popauth(ttl=2)
    mta.login(popauth, "127.0.0.2", "alice")
    assert rcpt_reply(mta.smtp_port, "127.0.0.2", REMOTE)[0] == 250
    deadline = time.monotonic() + 10
    while popauth.cli("query", "127.0.0.2").returncode == 0:
        assert time.monotonic() < deadline, "entry did not expire"
        time.sleep(0.1)
    mta.assert_relay_denied(rcpt_reply(mta.smtp_port, "127.0.0.2", REMOTE))


def test_popauth_stopped_means_tempfail(mta: Mta, popauth: PopauthServer) -> None:
    mta.login(popauth, "127.0.0.2", "alice")
    popauth.stop()
    # No recipient, remote or local, gets 250 afterwards: even a client that
    # logged in waits until popauth is back.
    with SmtpSession(mta.smtp_port, "127.0.0.2") as session:
        assert session.mail() == mta.tempfail_at_mail
        for recipient in (REMOTE, mta.local_recipient):
            code, text = session.rcpt(recipient)
            assert code == 503, (recipient, code, text)


# Recipient forms that end in the local domain but that the MTA, with its
# default settings (Sendmail: the contrib .mc), rewrites to
# someone@remote.example and relays.
DISGUISED_RELAYS = {
    "postfix": [
        "someone%remote.example@local.test",
        "remote.example!someone@local.test",
        '"someone@remote.example"@local.test',
        '"someone%remote.example"@local.test',
        "someone@remote.example@local.test",
        "@local.test:someone@remote.example",
    ],
    "sendmail": [
        "someone%remote.example@local.test",
        "remote.example!someone@local.test",
        '"someone@remote.example"@local.test',
        "@local.test:someone@remote.example",
    ],
}


@pytest.mark.parametrize(
    ("mta", "recipient"),
    [(name, recipient) for name in MTAS for recipient in DISGUISED_RELAYS[name]],
    indirect=["mta"],
)
def test_disguised_relays_are_refused(mta: Mta, popauth: PopauthServer, recipient: str) -> None:
    mta.assert_relay_denied(rcpt_reply(mta.smtp_port, "127.0.0.3", recipient))
    decision = popauth.events("relay_decision")[-1]
    # The MTA itself resolved it to its outbound transport: a real relay.
    assert decision["rcpt_mailer"] == mta.outbound_mailer, decision
    # A client that logged in may send to the same address.
    mta.login(popauth, "127.0.0.2", "bob")
    assert rcpt_reply(mta.smtp_port, "127.0.0.2", recipient)[0] == 250


def test_smtp_auth_relays_from_an_unlisted_address(mta: Mta, popauth: PopauthServer) -> None:
    user, password = mta.sasl_user
    with SmtpSession(mta.smtp_port, "127.0.0.5") as session:
        session.login(user, password)
        assert session.mail()[0] == 250
        assert session.rcpt(REMOTE)[0] == 250
        assert session.send_message([REMOTE])[0] == 250
    decision = popauth.events("relay_decision")[-1]
    assert (decision["reason"], decision["user"], decision["stage"]) == ("smtp_auth", user, "mail")
    assert popauth.cli("query", "127.0.0.5").returncode == 1
    # The next, unauthenticated session from there is a stranger again.
    mta.assert_relay_denied(rcpt_reply(mta.smtp_port, "127.0.0.5", REMOTE))
