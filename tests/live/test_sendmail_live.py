"""popauth in front of a real Sendmail whose .cf is built from contrib/sendmail.mc.

What only Sendmail does; the scenarios both MTAs share run in
test_mta_live.py. The .cf comes from the product's own contrib file,
wrapped only by test-only m4 defines (harness/sendmail.py), so a broken
contrib file fails here.

Sendmail checks a local recipient itself before the milter sees it
(``550 5.1.1 User unknown``), so the local recipients used here exist on
every Debian system: ``root`` (passwd) and ``postmaster`` (the test aliases).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from harness.popauth import PopauthServer
from harness.sendmail import (
    CONTRIB_MC,
    SendmailInstance,
    build_cf,
)
from harness.smtp import REMOTE, SmtpSession, rcpt_reply
from tests.live.conftest import PopauthFactory, start_sendmail

pytestmark = pytest.mark.live

LOCAL = "root@local.test"
# popauth answers "550 5.7.1 Relaying denied. <text>"; Sendmail puts the
# recipient between the status code and the text: "5.7.1 <rcpt>... Relaying...".
RELAYING_DENIED = "... Relaying denied. Turn on SMTP AUTH"
# check_rcpt's own relay refusal, which promiscuous_relay leaves out of the .cf.
SENDMAIL_RELAY_CHECK = 'R$*\t\t\t$#error $@ 5.7.1 $: "550 Relaying denied'

# Sendmail 8.17's default macro lists (cf/m4/cfhead.m4).
DEFAULT_MACROS = {
    "connect": ["j", "_", "{daemon_name}", "{if_name}", "{if_addr}"],
    "envfrom": [
        "i",
        "{auth_type}",
        "{auth_authen}",
        "{auth_ssf}",
        "{auth_author}",
        "{mail_mailer}",
        "{mail_host}",
        "{mail_addr}",
    ],
    "envrcpt": ["{rcpt_mailer}", "{rcpt_host}", "{rcpt_addr}"],
}


def assert_relay_denied(reply: tuple[int, str]) -> None:
    code, text = reply
    assert code == 550, reply
    assert text.startswith("5.7.1 <"), reply
    assert RELAYING_DENIED in text, reply


def cf_options(cf_text: str) -> dict[str, str]:
    """``O Name=value`` lines of a .cf (commented-out ``#O`` lines excluded)."""
    options = {}
    for line in cf_text.splitlines():
        if line.startswith("O "):
            name, _, value = line[2:].partition("=")
            options[name] = value
    return options


def macro_list(cf_text: str, stage: str) -> list[str]:
    value = cf_options(cf_text)[f"Milter.macros.{stage}"]
    return [name.strip() for name in value.split(",")]


# ------------------------------------------------------------------ the .cf


def test_contrib_mc_builds_the_production_cf(sendmail_root: Path, tmp_path: Path) -> None:
    """The contrib file on its own, as an admin builds it."""
    cf = build_cf(sendmail_root, CONTRIB_MC.read_text(), tmp_path / "sendmail.cf").read_text()
    assert "Xpopauth, S=unix:/run/popauth/milter.sock, F=T, T=C:5s;S:10s;R:20s;E:5m" in cf
    options = cf_options(cf)
    assert options["InputMailFilters"] == "popauth"
    assert "C{w}example.org" in cf.splitlines()
    # The defaults stay and popauth's macros are appended, each once.
    assert macro_list(cf, "connect") == [*DEFAULT_MACROS["connect"], "{client_addr}"]
    assert macro_list(cf, "envfrom") == DEFAULT_MACROS["envfrom"]
    assert macro_list(cf, "envrcpt") == DEFAULT_MACROS["envrcpt"]
    # promiscuous_relay: check_rcpt no longer refuses relaying by itself ...
    assert SENDMAIL_RELAY_CHECK not in cf
    # ... and it is the FEATURE line that does it (the .mc's comments do not).
    without = "".join(
        line
        for line in CONTRIB_MC.read_text().splitlines(keepends=True)
        if not line.startswith("FEATURE(`promiscuous_relay')")
    )
    cf_without = build_cf(sendmail_root, without, tmp_path / "without.cf").read_text()
    assert SENDMAIL_RELAY_CHECK in cf_without


def test_macro_lists_are_appended_to_not_replaced(sendmail_root: Path, tmp_path: Path) -> None:
    """A list an admin extended earlier in the .mc keeps its entries too."""
    before = "define(`confMILTER_MACROS_ENVRCPT', ``{rcpt_mailer}, {other_milters_macro}'')dnl\n"
    cf = build_cf(
        sendmail_root, before + CONTRIB_MC.read_text(), tmp_path / "sendmail.cf"
    ).read_text()
    assert macro_list(cf, "envrcpt") == [
        "{rcpt_mailer}",
        "{other_milters_macro}",
        "{rcpt_addr}",
        "{rcpt_host}",
    ]


def test_test_cf_is_the_contrib_cf_plus_test_settings(sendmail: SendmailInstance) -> None:
    cf = sendmail.cf_path.read_text()
    assert f"S=unix:{sendmail.cf_path.parent.parent / 'popauth' / 'milter.sock'}, F=T" in cf
    assert cf_options(cf)["DeliveryMode"] == "queueonly"
    assert macro_list(cf, "connect") == [*DEFAULT_MACROS["connect"], "{client_addr}"]
    # Debian 12 ships 8.17, Debian 13 8.18.
    assert re.match(r"220 mx\.local\.test ESMTP Sendmail 8\.1[78]\.", sendmail.banner)


# ------------------------------------------------------------------ verdicts


def test_local_recipients_from_anyone(sendmail: SendmailInstance, popauth: PopauthServer) -> None:
    recipients = [
        LOCAL,
        "postmaster@local.test",
        "postmaster",
        "root@LOCAL.TEST",
        "root@local.test.",
    ]
    for client in ("127.0.0.2", "127.0.0.3"):
        with SmtpSession(sendmail.smtp_port, client) as session:
            assert session.mail()[0] == 250
            for recipient in recipients:
                assert session.rcpt(recipient)[0] == 250, recipient
            assert session.send_message(recipients)[0] == 250
    decisions = popauth.events("relay_decision")
    assert len(decisions) == 2 * len(recipients)
    assert {(d["reason"], d["rcpt_mailer"]) for d in decisions} == {("local_recipient", "local")}


def test_unknown_local_user_is_refused_by_sendmail_itself(
    sendmail: SendmailInstance, popauth: PopauthServer
) -> None:
    code, text = rcpt_reply(sendmail.smtp_port, "127.0.0.3", "nosuchuser@local.test")
    assert (code, text) == (550, "5.1.1 <nosuchuser@local.test>... User unknown")
    assert popauth.events("relay_decision") == []  # the milter never saw it


def test_login_whitelists_that_client_only(
    sendmail: SendmailInstance, popauth: PopauthServer
) -> None:
    login = popauth.cli("login", "127.0.0.2", "alice")
    assert login.returncode == 0, login
    with SmtpSession(sendmail.smtp_port, "127.0.0.2") as session:
        assert session.mail()[0] == 250
        assert session.rcpt(REMOTE)[0] == 250
        assert session.rcpt("another@remote.example")[0] == 250
        assert session.send_message([REMOTE, "another@remote.example"])[0] == 250
    assert_relay_denied(rcpt_reply(sendmail.smtp_port, "127.0.0.3", REMOTE))
    whitelisted = [d for d in popauth.events("relay_decision") if d["reason"] == "whitelisted"]
    assert whitelisted[-1]["user"] == "alice"
    assert whitelisted[-1]["client_ip"] == "127.0.0.2"


def test_failed_smtp_auth_relays_nothing(
    sendmail: SendmailInstance, popauth: PopauthServer
) -> None:
    with SmtpSession(sendmail.smtp_port, "127.0.0.5") as session:
        code, _ = session.client.docmd("AUTH", "PLAIN AGNhcm9sAHdyb25n")  # carol / wrong
        assert code == 535
        assert session.mail()[0] == 250
        assert_relay_denied(session.rcpt(REMOTE))


# ------------------------------------------------------- {rcpt_mailer} words


def test_postfix_style_local_mailers_fail_safe(
    sendmail: SendmailInstance, start_popauth: PopauthFactory
) -> None:
    """Configured with a word Sendmail never uses for local delivery."""
    popauth = start_popauth(local_mailers=["esmtp"])
    # Sendmail says `local', which is no longer local: inbound mail refused
    # (the visible symptom of this misconfiguration) ...
    assert_relay_denied(rcpt_reply(sendmail.smtp_port, "127.0.0.3", LOCAL))
    # ... and `esmtp' for a remote domain is still no local recipient:
    # the domain must be a local one as well.
    assert_relay_denied(rcpt_reply(sendmail.smtp_port, "127.0.0.3", REMOTE))
    assert [d["rcpt_mailer"] for d in popauth.events("relay_decision")] == ["local", "esmtp"]


def test_smart_host_gives_relay(
    sendmail_root: Path, live_root: Path, popauth_dir: Path, popauth: PopauthServer
) -> None:
    """With a SMART_HOST, Sendmail's word for outbound mail is `relay'."""
    smart = start_sendmail(
        sendmail_root,
        live_root / "sendmail-smarthost",
        popauth_dir,
        extra="define(`SMART_HOST', `[127.0.0.1]')dnl",
    )
    try:
        assert_relay_denied(rcpt_reply(smart.smtp_port, "127.0.0.3", REMOTE))
        assert rcpt_reply(smart.smtp_port, "127.0.0.3", LOCAL)[0] == 250
    finally:
        smart.stop()
    mailers = [(d["reason"], d["rcpt_mailer"]) for d in popauth.events("relay_decision")]
    assert mailers == [("relay_denied", "relay"), ("local_recipient", "local")]


def test_sendmail_honours_the_milters_symbol_list(
    sendmail_root: Path, live_root: Path, popauth_dir: Path, popauth: PopauthServer
) -> None:
    """With every configured macro list emptied, popauth still gets its macros:
    Sendmail sends what the milter asked for at negotiation (SMFIF_SETSYMLIST)."""
    emptied = "\n".join(
        f"define(`confMILTER_MACROS_{stage}', `')dnl" for stage in ("CONNECT", "ENVFROM", "ENVRCPT")
    )
    bare = start_sendmail(
        sendmail_root, live_root / "sendmail-nomacros", popauth_dir, extra=emptied
    )
    try:
        cf = bare.cf_path.read_text()
        for stage in ("connect", "envfrom", "envrcpt"):
            assert f"O Milter.macros.{stage}\n" in cf or f"O Milter.macros.{stage}=\n" in cf
        assert rcpt_reply(bare.smtp_port, "127.0.0.3", LOCAL)[0] == 250
        assert_relay_denied(rcpt_reply(bare.smtp_port, "127.0.0.3", REMOTE))
    finally:
        bare.stop()
    mailers = [(d["reason"], d["rcpt_mailer"]) for d in popauth.events("relay_decision")]
    assert mailers == [("local_recipient", "local"), ("relay_denied", "esmtp")]


def test_pop_first_sender_own_binds_the_sender_to_the_entrys_users(
    sendmail: SendmailInstance, start_popauth: PopauthFactory
) -> None:
    popauth = start_popauth(pop_first_sender="own")
    for user in ("alice", "bob"):
        assert popauth.cli("login", "127.0.0.2", user).returncode == 0
    for user in ("alice", "bob"):
        with SmtpSession(sendmail.smtp_port, "127.0.0.2") as session:
            assert session.mail(f"{user}@local.test")[0] == 250
            assert session.rcpt(REMOTE)[0] == 250, user
            assert session.send_message([REMOTE])[0] == 250
    with SmtpSession(sendmail.smtp_port, "127.0.0.2") as session:
        assert session.mail("carol@local.test")[0] == 250
        code, text = session.rcpt(REMOTE)
        assert code == 550
        # Sendmail puts the recipient before the milter's text.
        assert text.startswith("5.7.1 "), text
        assert "Sender address is not yours: check your mail" in text, text
    with SmtpSession(sendmail.smtp_port, "127.0.0.2") as session:
        assert session.mail("")[0] == 250
        code, text = session.rcpt(REMOTE)
        assert code == 550
        assert text.startswith("5.7.1 "), text
        assert "A null sender (<>) may not relay" in text, text
    assert popauth.cli("revoke", "--user", "bob").returncode == 0
    with SmtpSession(sendmail.smtp_port, "127.0.0.2") as session:
        assert session.mail("alice@local.test")[0] == 250
        assert session.rcpt(REMOTE)[0] == 250
        assert session.rset()[0] == 250
        assert session.mail("bob@local.test")[0] == 250
        assert session.rcpt(REMOTE)[0] == 550


def test_a_spent_relay_budget_is_451_through_sendmail(
    sendmail: SendmailInstance, start_popauth: PopauthFactory
) -> None:
    popauth = start_popauth(pop_first_max_recipients=2, pop_first_budget_window=60)
    assert popauth.cli("login", "127.0.0.2", "alice").returncode == 0
    with SmtpSession(sendmail.smtp_port, "127.0.0.2") as session:
        assert session.mail()[0] == 250
        assert session.rcpt(REMOTE)[0] == 250
        assert session.rcpt("another@remote.example")[0] == 250
        assert session.rcpt("third@remote.example") == (
            451,
            "4.7.1 Too many recipients for a POP/IMAP login: try again later,"
            " or turn on SMTP AUTH.",
        )
        assert session.rcpt(LOCAL)[0] == 250  # local mail from anyone, never counted
        assert session.send_message([])[0] == 250
    reasons = [d["reason"] for d in popauth.events("relay_decision")]
    assert reasons == ["whitelisted", "whitelisted", "budget_spent", "whitelisted"]
    assert len(popauth.events("relay_budget_spent")) == 1


def test_pop_first_retire_at_through_sendmail(
    sendmail: SendmailInstance, start_popauth: PopauthFactory
) -> None:
    """warn until a time a few seconds ahead, then the retired reply; bob is exempt."""
    at = int(time.time()) + 5
    written = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))
    popauth = start_popauth(
        pop_first="warn", pop_first_retire_at=written, pop_first_exempt_users=["bob"]
    )
    assert popauth.cli("login", "127.0.0.2", "alice").returncode == 0
    assert popauth.cli("login", "127.0.0.8", "bob").returncode == 0
    assert rcpt_reply(sendmail.smtp_port, "127.0.0.2", REMOTE)[0] == 250
    assert popauth.events("pop_first_deprecated")[-1]["retire_at"] == written
    assert time.time() < at, "the first part of the test took too long"
    time.sleep(max(0.0, at - time.time()) + 0.2)
    code, text = rcpt_reply(sendmail.smtp_port, "127.0.0.2", REMOTE)
    assert code == 550
    # Sendmail puts the recipient before the milter's text.
    assert text.startswith("5.7.1 "), text
    assert "... Relaying denied. POP before SMTP has been retired: turn on SMTP AUTH" in text, text
    print(f"Sendmail, after the date: {code} {text}")
    assert rcpt_reply(sendmail.smtp_port, "127.0.0.8", REMOTE)[0] == 250
    assert rcpt_reply(sendmail.smtp_port, "127.0.0.2", LOCAL)[0] == 250
