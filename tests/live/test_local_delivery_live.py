"""Local delivery learned from a real Postfix, one mail-host layout at a time.

For each layout popauth runs with learned settings only (no local_domains, no
local_mailers): a stranger's inbound mail is accepted at RCPT and after DATA,
a remote recipient is refused, and every disguised relay form ending in the
layout's domain is refused too. The ``{rcpt_mailer}`` Postfix really sends
for the inbound recipient is asserted, so a change in Postfix shows here.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from harness.dovecot import DovecotInstance
from harness.popauth import POPAUTH, PopauthServer
from harness.ports import free_port
from harness.postfix import PostfixInstance
from harness.smtp import REMOTE, SmtpSession, rcpt_reply
from tests.live.conftest import USERS, PopauthFactory

pytestmark = pytest.mark.live

STRANGER = "127.0.0.3"
RELAYING_DENIED = "5.7.1 Relaying denied."
# Every form that ends in domain D but that Postfix relays to remote.example.
DISGUISES = (
    "someone%remote.example@{D}",
    "remote.example!someone@{D}",
    '"someone@remote.example"@{D}',
    "@{D}:someone@remote.example",
    "someone@remote.example@{D}",
)
# Nothing is learned from the stock test layout but this: no local_* keys.
LEARNED_ONLY = {"local_domains": None, "local_mailers": None}


@dataclass
class Layout:
    """One way a real mail host delivers its domain ``domain``."""

    name: str
    domain: str
    # The {rcpt_mailer} Postfix sends for a recipient in ``domain``.
    mailer: str
    # Where check-config must say that mailer was learned from.
    mailer_origin: str
    main_cf: Callable[[Path], dict[str, str]]
    files: dict[str, str] = field(default_factory=dict)
    service_commands: dict[str, str] = field(default_factory=dict)


LAYOUTS = [
    Layout(
        name="stock",
        domain="mx.stock.test",
        mailer="local",
        mailer_origin="postfix local_transport (for mydestination)",
        main_cf=lambda root: {
            "myhostname": "mx.stock.test",
            "mydomain": "stock.test",
            # Postfix's own default, with its $-expansions.
            "mydestination": "$myhostname, localhost.$mydomain, localhost",
        },
    ),
    Layout(
        name="virtual-alias",
        domain="alias.test",
        mailer="error",
        mailer_origin="postfix virtual_alias_domains",
        main_cf=lambda root: {
            "virtual_alias_domains": "alias.test",
            "virtual_alias_maps": f"texthash:{root}/virtual",
        },
        files={"virtual": "someone@alias.test alice@local.test\n"},
    ),
    Layout(
        name="relay-domains-backup-mx",
        domain="backup.test",
        mailer="relay",
        mailer_origin="postfix relay_transport (for relay_domains)",
        main_cf=lambda root: {"relay_domains": f"hash:{root}/relay_domains"},
        files={"relay_domains": "backup.test OK\n"},
    ),
    Layout(
        name="transport-maps",
        domain="routed.test",
        mailer="internal-lmtp",
        mailer_origin="postfix transport_maps",
        main_cf=lambda root: {
            "mydestination": f"local.test, localhost, {root}/local-domains",
            "transport_maps": f"texthash:{root}/transport",
        },
        files={
            "local-domains": "# routed by transport_maps\nrouted.test\n",
            "transport": "routed.test internal-lmtp:unix:private/nowhere\n",
        },
        service_commands={"internal-lmtp": "discard"},
    ),
]


def start_layout_postfix(
    root: Path, popauth_dir: Path, layout: Layout, extra: dict[str, str] | None = None
) -> PostfixInstance:
    root.mkdir(mode=0o755)
    for name, text in layout.files.items():
        (root / name).write_text(text)
    instance = PostfixInstance(
        root=root,
        smtp_port=free_port(),
        milter=f"unix:{popauth_dir / 'milter.sock'}",
        local_domain="local.test",
        extra_main_cf={**layout.main_cf(root), **(extra or {})},
        service_commands=layout.service_commands,
    )
    instance.prepare()
    # hash: tables need their .db, made by Postfix's own postmap.
    for name in layout.files:
        if f"hash:{root}/{name}" in instance.main_cf().values():
            command = ["postmap", "-c", str(instance.config_dir), f"hash:{root}/{name}"]
            subprocess.run(command, check=True)
    instance.start()
    return instance


def check_config(server: PopauthServer) -> str:
    completed = subprocess.run(
        [POPAUTH, "check-config", str(server.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed
    return completed.stdout


def assert_relay_denied(reply: tuple[int, str]) -> None:
    assert reply[0] == 550, reply
    assert reply[1].startswith(RELAYING_DENIED), reply


def assert_inbound_accepted(port: int, recipient: str) -> None:
    with SmtpSession(port, STRANGER) as session:
        assert session.mail()[0] == 250
        assert session.rcpt(recipient)[0] == 250, recipient
        assert session.send_message([recipient])[0] == 250


def assert_relays_refused(port: int, domain: str, server: PopauthServer) -> None:
    """A remote recipient and every disguise: popauth's 550 5.7.1, or Postfix's own 5xx.

    Postfix refuses some disguises itself before the milter is asked (a
    virtual alias domain does no percent hack: "User unknown in virtual alias
    table"); popauth must refuse every one that reaches it.
    """
    assert_relay_denied(rcpt_reply(port, STRANGER, REMOTE))
    for disguise in DISGUISES:
        recipient = disguise.format(D=domain)
        before = len(server.events("relay_decision"))
        code, text = rcpt_reply(port, STRANGER, recipient)
        print(f"{domain}: RCPT TO:<{recipient}> -> {code} {text}")
        assert 500 <= code < 600, (recipient, code, text)
        decisions = server.events("relay_decision")[before:]
        if text.startswith(RELAYING_DENIED):
            assert decisions[-1]["reason"] == "relay_denied", (recipient, decisions)
        else:
            assert "Recipient address rejected" in text, (recipient, code, text)
            assert decisions == [], (recipient, decisions)


@pytest.fixture(params=LAYOUTS, ids=lambda layout: layout.name)
def layout_postfix(
    request: pytest.FixtureRequest, live_root: Path, popauth_dir: Path
) -> Iterator[tuple[Layout, PostfixInstance]]:
    layout: Layout = request.param
    # Short: Postfix's socket paths under it must stay within sun_path's 108 bytes.
    instance = start_layout_postfix(
        live_root / f"pf-{LAYOUTS.index(layout)}-{time.monotonic_ns() % 10**9}", popauth_dir, layout
    )
    yield layout, instance
    instance.stop()


def test_layout_learned_inbound_accepted_relays_refused(
    layout_postfix: tuple[Layout, PostfixInstance], start_popauth: PopauthFactory
) -> None:
    layout, postfix = layout_postfix
    popauth = start_popauth(**LEARNED_ONLY, postfix_config_directory=str(postfix.config_dir))
    shown = check_config(popauth)
    assert f"learned from: postfix (config_directory {postfix.config_dir})" in shown
    mailer_lines = [line for line in shown.splitlines() if line.startswith(f"  {layout.mailer} ")]
    assert mailer_lines, shown
    assert layout.mailer_origin in mailer_lines[0], shown
    assert any(line.startswith(f"  {layout.domain} ") for line in shown.splitlines()), shown

    recipient = f"someone@{layout.domain}"
    assert_inbound_accepted(postfix.smtp_port, recipient)
    accepted = [d for d in popauth.events("relay_decision") if d["recipient"] == f"<{recipient}>"]
    assert accepted[-1]["reason"] == "local_recipient", accepted
    assert accepted[-1]["rcpt_mailer"] == layout.mailer, accepted
    assert_relays_refused(postfix.smtp_port, layout.domain, popauth)
    assert popauth.events("local_domain_with_foreign_mailer") == []


@pytest.fixture
def lmtp_delivery(
    tmp_path: Path, live_root: Path, popauth_dir: Path
) -> Iterator[tuple[PostfixInstance, DovecotInstance]]:
    """virtual_mailbox_domains over LMTP into a real dovecot-lmtpd and a Maildir."""
    lmtp_socket = tmp_path / "dovecot" / "lmtp"
    dovecot = DovecotInstance(
        root=tmp_path / "dovecot", pop3_port=free_port(), users=USERS, lmtp_socket=lmtp_socket
    )
    dovecot.start()
    layout = Layout(
        name="virtual-lmtp",
        domain="vmail.test",
        mailer="lmtp",
        mailer_origin="postfix virtual_transport (for virtual_mailbox_domains)",
        main_cf=lambda root: {
            "virtual_mailbox_domains": "vmail.test",
            "virtual_transport": f"lmtp:unix:{lmtp_socket}",
        },
        # A real LMTP client in place of the harness's discarding "lmtp".
        service_commands={"lmtp": "lmtp"},
    )
    postfix = start_layout_postfix(
        live_root / f"postfix-lmtp-{time.monotonic_ns()}", popauth_dir, layout
    )
    yield postfix, dovecot
    postfix.stop()
    dovecot.stop()


def wait_for_maildir(maildir: Path, timeout: float = 20.0) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        delivered = list((maildir / "new").glob("*")) if (maildir / "new").is_dir() else []
        if delivered:
            return delivered
        time.sleep(0.05)
    return []


def test_virtual_mailbox_domain_over_lmtp_into_dovecot(
    lmtp_delivery: tuple[PostfixInstance, DovecotInstance], start_popauth: PopauthFactory
) -> None:
    postfix, dovecot = lmtp_delivery
    popauth = start_popauth(**LEARNED_ONLY, postfix_config_directory=str(postfix.config_dir))
    shown = check_config(popauth)
    assert "postfix virtual_transport (for virtual_mailbox_domains)" in shown
    assert_inbound_accepted(postfix.smtp_port, "alice@vmail.test")
    decision = popauth.events("relay_decision")[-1]
    assert (decision["reason"], decision["rcpt_mailer"]) == ("local_recipient", "lmtp")
    delivered = wait_for_maildir(dovecot.root / "mail" / "alice" / "Maildir")
    assert delivered, f"no delivery:\n{postfix.log_text()[-3000:]}\n{dovecot.log_text()[-2000:]}"
    assert "Subject: popauth live test" in delivered[0].read_text()
    assert_relays_refused(postfix.smtp_port, "vmail.test", popauth)


def test_a_foreign_mailer_for_a_local_domain_is_warned_once(
    lmtp_delivery: tuple[PostfixInstance, DovecotInstance], start_popauth: PopauthFactory
) -> None:
    """The old default (local_mailers = ["local"]) on an LMTP host: refused, told once."""
    postfix, _ = lmtp_delivery
    popauth = start_popauth(
        local_domains=None,
        local_mailers=["local"],
        postfix_config_directory=str(postfix.config_dir),
    )
    for _ in range(3):
        assert_relay_denied(rcpt_reply(postfix.smtp_port, STRANGER, "alice@vmail.test"))
    assert_relay_denied(rcpt_reply(postfix.smtp_port, STRANGER, "bob@vmail.test"))
    warnings = popauth.events("local_domain_with_foreign_mailer")
    assert [(w["rcpt_mailer"], w["domain"], w["setting"]) for w in warnings] == [
        ("lmtp", "vmail.test", "local_mailers")
    ]


# A backup MX for backup.test that must not relay for one customer's
# subdomain, on a host whose example.test has one address routed onwards
# over smtp (the default transport's word). popauth once learned "smtp" as a
# local mailer and ".backup.test" without the exclusion: a stranger's mail to
# customer.backup.test was accepted as local and Postfix relayed it away.
BACKUP_MX = Layout(
    name="backup-mx-with-an-exclusion",
    domain="backup.test",
    mailer="relay",
    mailer_origin="postfix relay_transport (for relay_domains)",
    main_cf=lambda root: {
        "myhostname": "mx.example.test",
        "mydestination": "$myhostname, example.test, localhost",
        # parent_domain_matches_subdomains includes relay_domains by default.
        "relay_domains": "!customer.backup.test, backup.test",
        "transport_maps": f"texthash:{root}/transport",
    },
    files={"transport": "legacy@example.test smtp:[192.0.2.10]\n"},
)


def test_an_excluded_relay_domain_is_refused_to_strangers(
    live_root: Path, popauth_dir: Path, start_popauth: PopauthFactory
) -> None:
    root = live_root / f"postfix-exclusion-{time.monotonic_ns()}"
    postfix = start_layout_postfix(root, popauth_dir, BACKUP_MX)
    try:
        popauth = start_popauth(**LEARNED_ONLY, postfix_config_directory=str(postfix.config_dir))
        port = postfix.smtp_port
        for excluded in ("anyone@customer.backup.test", "anyone@deep.customer.backup.test"):
            reply = rcpt_reply(port, STRANGER, excluded)
            decision = popauth.events("relay_decision")[-1]
            # Postfix would relay it: its default class, with the default transport.
            assert decision["rcpt_mailer"] == "smtp", decision
            assert_relay_denied(reply)
            assert decision["reason"] == "relay_denied", decision
        # The rest of the backup MX, and the routed address, still come in.
        expected = {
            "anyone@backup.test": "relay",
            "anyone@sub.backup.test": "relay",
            "legacy@example.test": "smtp",
            "other@example.test": "local",
        }
        for recipient, mailer in expected.items():
            assert_inbound_accepted(port, recipient)
            accepted = popauth.events("relay_decision")[-1]
            assert (accepted["reason"], accepted["rcpt_mailer"]) == ("local_recipient", mailer)
        # smtp is local for the routed address only.
        assert_relay_denied(rcpt_reply(port, STRANGER, "someone@remote.example"))
        assert_relays_refused(port, "backup.test", popauth)
        assert_relays_refused(port, "example.test", popauth)
        shown = check_config(popauth)
        assert "delivery class relay: relay_domains (a name matches its subdomains too)" in shown
        assert "  !customer.backup.test    postfix relay_domains" in shown
        assert "(legacy@example.test)" in shown
    finally:
        postfix.stop()


def test_sighup_learns_a_new_domain(
    live_root: Path, popauth_dir: Path, start_popauth: PopauthFactory
) -> None:
    """main.cf gains a domain; after SIGHUP popauth accepts its mail, not before."""
    stock = LAYOUTS[0]
    root = live_root / f"postfix-hup-{time.monotonic_ns()}"
    postfix = start_layout_postfix(root, popauth_dir, stock)
    try:
        popauth = start_popauth(**LEARNED_ONLY, postfix_config_directory=str(postfix.config_dir))
        assert_relay_denied(rcpt_reply(postfix.smtp_port, STRANGER, "someone@new.test"))
        main_cf = postfix.config_dir / "main.cf"
        text = main_cf.read_text().replace(
            "mydestination = $myhostname, localhost.$mydomain, localhost",
            "mydestination = $myhostname, localhost.$mydomain, localhost, new.test",
        )
        assert "new.test" in text
        main_cf.write_text(text)
        past = time.time() - 10  # Postfix waits for a main.cf still being written
        os.utime(main_cf, (past, past))
        assert postfix._postfix("reload").returncode == 0
        # Postfix now delivers new.test itself; popauth still has the old lists.
        deadline = time.monotonic() + 20
        while True:
            reply = rcpt_reply(postfix.smtp_port, STRANGER, "someone@new.test")
            decision = popauth.events("relay_decision")[-1]
            if decision["rcpt_mailer"] == "local":
                break
            assert time.monotonic() < deadline, decision
            time.sleep(0.1)
        assert_relay_denied(reply)
        assert popauth.process is not None
        popauth.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while not popauth.events("local_delivery_reloaded"):
            assert popauth.process.poll() is None, "popauth stopped on SIGHUP"
            assert time.monotonic() < deadline, popauth.events()[-5:]
            time.sleep(0.05)
        reloaded = popauth.events("local_delivery_reloaded")[-1]
        assert "new.test (postfix mydestination)" in reloaded["local_domains"]
        assert_inbound_accepted(postfix.smtp_port, "someone@new.test")
        assert_relays_refused(postfix.smtp_port, "new.test", popauth)
        assert popauth.cli("ping").returncode == 0  # still serving every door
    finally:
        postfix.stop()


def test_sighup_with_an_unreadable_configuration_keeps_the_old_lists(
    live_root: Path, popauth_dir: Path, start_popauth: PopauthFactory
) -> None:
    stock = LAYOUTS[0]
    root = live_root / f"postfix-bad-{time.monotonic_ns()}"
    postfix = start_layout_postfix(root, popauth_dir, stock)
    try:
        popauth = start_popauth(**LEARNED_ONLY, postfix_config_directory=str(postfix.config_dir))
        main_cf = postfix.config_dir / "main.cf"
        good = main_cf.read_text()
        main_cf.write_text(
            good.replace(
                "mydestination = $myhostname, localhost.$mydomain, localhost",
                f"mydestination = hash:{postfix.root}/does-not-exist",
            )
        )
        assert popauth.process is not None
        popauth.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while not popauth.events("local_delivery_not_reloaded"):
            assert time.monotonic() < deadline, popauth.events()[-5:]
            time.sleep(0.05)
        assert "does-not-exist" in popauth.events("local_delivery_not_reloaded")[-1]["error"]
        # Postfix's new smtpd processes read main.cf too: put it back, and
        # popauth, which kept its lists, still accepts inbound mail.
        main_cf.write_text(good)
        past = time.time() - 10
        os.utime(main_cf, (past, past))
        assert_inbound_accepted(postfix.smtp_port, "someone@mx.stock.test")
        assert popauth.events("relay_decision")[-1]["reason"] == "local_recipient"
        assert_relay_denied(rcpt_reply(postfix.smtp_port, STRANGER, REMOTE))
    finally:
        postfix.stop()


def test_smtpd_sender_login_maps_is_learned_for_pop_first_sender(
    live_root: Path, popauth_dir: Path, start_popauth: PopauthFactory
) -> None:
    """The owners Postfix's own table names may send as those senders (own)."""
    stock = LAYOUTS[0]
    root = live_root / f"postfix-senders-{time.monotonic_ns()}"
    table = "shared@mx.stock.test carol, dave\n@partner.test carol\n"
    layout = dataclasses.replace(stock, files={**stock.files, "senders": table})
    postfix = start_layout_postfix(
        root, popauth_dir, layout, {"smtpd_sender_login_maps": f"hash:{root}/senders"}
    )
    try:
        popauth = start_popauth(
            **LEARNED_ONLY,
            postfix_config_directory=str(postfix.config_dir),
            pop_first_sender="own",
        )
        assert "smtpd_sender_login_maps: 2 senders learned" in check_config(popauth)
        assert popauth.cli("login", "127.0.0.2", "carol").returncode == 0
        for sender, code in (
            ("shared@mx.stock.test", 250),
            ("Someone@Partner.test", 250),
            ("carol@mx.stock.test", 250),  # the rule: her name at a local domain
            ("other@mx.stock.test", 550),
        ):
            with SmtpSession(postfix.smtp_port, "127.0.0.2") as session:
                assert session.mail(sender)[0] == 250
                assert session.rcpt(REMOTE)[0] == code, sender
    finally:
        postfix.stop()
