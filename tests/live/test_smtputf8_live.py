"""Issue 11, defect 6, live: UTF-8 addresses and user names through a real
Postfix with ``smtputf8_enable = yes`` and Dovecot SASL.

A UTF-8 local recipient is accepted, a UTF-8 remote one refused, and an SMTP
AUTH user with a UTF-8 name relays. (The bytes that are not UTF-8 at all go
through the milter protocol directly: tests/protocol/test_eight_bit_macros.py.)
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from harness.dovecot import DovecotInstance
from harness.leftovers import make_run_directory
from harness.popauth import PopauthServer
from harness.ports import free_port
from harness.postfix import PostfixInstance
from harness.smtp import SmtpSession
from tests.live.conftest import LIVE_SETTINGS

pytestmark = pytest.mark.live

UTF8_USER = "jörg"
PASSWORD = "grünkohl"


class Utf8Dovecot(DovecotInstance):
    """Dovecot that takes any byte in a user name (its default is ASCII only)."""

    def config(self) -> str:
        return super().config() + "auth_username_chars =\n"


@pytest.fixture(scope="module")
def site() -> Iterator[tuple[PostfixInstance, PopauthServer]]:
    root = make_run_directory("popauth-utf8-")
    (root / "sasl").mkdir(mode=0o755)
    (root / "popauth").mkdir(mode=0o755)
    dovecot = Utf8Dovecot(
        root=root / "dovecot",
        pop3_port=free_port(),
        users={UTF8_USER: PASSWORD, "alice": "wonderland"},
        auth_socket_for_postfix=root / "sasl" / "auth",
    )
    postfix = PostfixInstance(
        root=root / "postfix",
        smtp_port=free_port(),
        milter=f"unix:{root / 'popauth' / 'milter.sock'}",
        local_domain="local.test",
        sasl_path=str(root / "sasl" / "auth"),
        extra_main_cf={
            "myhostname": "mx.local.test",
            "myorigin": "local.test",
            "smtputf8_enable": "yes",
        },
    )
    popauth = PopauthServer(root / "popauth", **LIVE_SETTINGS)
    try:
        dovecot.start()
        popauth.start()
        postfix.start()
        yield postfix, popauth
    finally:
        postfix.stop()
        popauth.stop()
        dovecot.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_postfix_offers_smtputf8(site: tuple[PostfixInstance, PopauthServer]) -> None:
    postfix, _ = site
    with SmtpSession(postfix.smtp_port, "127.0.0.2") as session:
        assert session.client.has_extn("smtputf8")


def test_utf8_local_recipient_is_accepted(site: tuple[PostfixInstance, PopauthServer]) -> None:
    postfix, popauth = site
    with SmtpSession(postfix.smtp_port, "127.0.0.2") as session:
        assert session.raw("MAIL FROM:<sender@example.org> SMTPUTF8")[0] == 250
        reply = session.raw(f"RCPT TO:<{UTF8_USER}@local.test>")
        assert reply[0] == 250, reply
    decision = popauth.events("relay_decision")[-1]
    assert (decision["reason"], decision["rcpt_addr"]) == (
        "local_recipient",
        f"{UTF8_USER}@local.test",
    )


def test_utf8_remote_recipient_is_refused(site: tuple[PostfixInstance, PopauthServer]) -> None:
    postfix, popauth = site
    with SmtpSession(postfix.smtp_port, "127.0.0.2") as session:
        assert session.raw("MAIL FROM:<sender@example.org> SMTPUTF8")[0] == 250
        code, text = session.raw(f"RCPT TO:<{UTF8_USER}@bücher.example>")
    assert code == 550, (code, text)
    assert text.startswith("5.7.1 Relaying denied.")
    decision = popauth.events("relay_decision")[-1]
    assert (decision["reason"], decision["recipient"]) == (
        "relay_denied",
        f"<{UTF8_USER}@bücher.example>",
    )


def test_smtp_auth_user_with_a_utf8_name_relays(
    site: tuple[PostfixInstance, PopauthServer],
) -> None:
    postfix, popauth = site
    with SmtpSession(postfix.smtp_port, "127.0.0.3") as session:
        assert session.auth_plain(UTF8_USER, PASSWORD)[0] == 235
        assert session.raw("MAIL FROM:<sender@example.org> SMTPUTF8")[0] == 250
        reply = session.raw(f"RCPT TO:<{UTF8_USER}@bücher.example>")
        assert reply[0] == 250, reply
        assert session.send_message([])[0] == 250
    decision = popauth.events("relay_decision")[-1]
    assert (decision["reason"], decision["user"]) == ("smtp_auth", UTF8_USER)
    assert popauth.events("milter_callback_failed") == []
