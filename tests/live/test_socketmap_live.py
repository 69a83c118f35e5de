"""The socketmap door through real Postfix and Sendmail.

Each MTA keeps its own relay gate and asks popauth's socketmap whether the
client address is whitelisted. Postfix's relay restrictions are read from
``contrib/postfix/socketmap-main.cf`` and Sendmail's .cf is built from
``contrib/sendmail-socketmap.mc``: a broken contrib file fails here.

Every client is a loopback address other than 127.0.0.1 (which Postfix's
``mynetworks`` permits): whitelisted 127.0.0.2, strangers 127.0.0.3 and up.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.dovecot import DovecotInstance
from harness.popauth import PopauthServer
from harness.ports import free_port
from harness.postfix import PostfixInstance, contrib_relay_restrictions
from harness.redis import RedisInstance
from harness.sendmail import (
    DEFAULT_CACHE_DIR,
    REPO,
    SendmailInstance,
    ensure_sendmail_root,
    mc_test_postlude,
    mc_test_prelude,
)
from harness.smtp import REMOTE, SmtpSession, rcpt_reply
from popauth.doors.socketmap import codec
from tests.live.conftest import (
    DISGUISED,
    USERS,
    PopauthFactory,
    ask_by_hand,
    assert_postfix_relay_denied,
    mx_postfix,
)

pytestmark = pytest.mark.live

SENDMAIL_MC = REPO / "contrib" / "sendmail-socketmap.mc"

WHITELISTED = "127.0.0.2"
STRANGER = "127.0.0.3"


def socketmap_path(popauth_dir: Path) -> Path:
    return popauth_dir / "socketmap.sock"


def lookup(path: Path, key: str, name: str = "popauth") -> bytes:
    """One socketmap request by hand; the reply payload."""
    return ask_by_hand(path, codec.encode(f"{name} {key}".encode()), _netstring)


def _netstring(buffer: bytes) -> bytes | None:
    decoded = codec.decode(buffer, 100_000)
    return None if decoded is None else decoded[0]


def start_with_socketmap(
    start_popauth: PopauthFactory, popauth_dir: Path, **overrides: object
) -> PopauthServer:
    server = start_popauth(
        socketmap_socket=str(socketmap_path(popauth_dir)),
        socketmap_socket_mode="0666",
        **overrides,
    )
    # start_popauth waited for every socket, the socketmap's included.
    assert lookup(socketmap_path(popauth_dir), "unknown") == b"NOTFOUND "
    return server


# --- Postfix --------------------------------------------------------------


@pytest.fixture(scope="module")
def postfix_socketmap(
    live_root: Path, popauth_dir: Path, dovecot: DovecotInstance
) -> Iterator[PostfixInstance]:
    with mx_postfix(
        live_root / "postfix-socketmap",
        dovecot,
        relay_restrictions=contrib_relay_restrictions(socketmap_path(popauth_dir)),
    ) as instance:
        yield instance


def test_postfix_whitelisted_client_relays(
    postfix_socketmap: PostfixInstance, start_popauth: PopauthFactory, popauth_dir: Path
) -> None:
    popauth = start_with_socketmap(start_popauth, popauth_dir)
    assert popauth.ask(f"LOGIN {WHITELISTED} alice")[0].startswith("OK ")
    with SmtpSession(postfix_socketmap.smtp_port, WHITELISTED) as session:
        assert session.mail()[0] == 250
        assert session.rcpt(REMOTE) == (250, "2.1.5 Ok")
        assert session.rcpt("friend@elsewhere.example") == (250, "2.1.5 Ok")
        assert session.send_message([REMOTE])[0] == 250


def test_postfix_stranger_is_refused_local_mail_accepted(
    postfix_socketmap: PostfixInstance, start_popauth: PopauthFactory, popauth_dir: Path
) -> None:
    popauth = start_with_socketmap(start_popauth, popauth_dir)
    popauth.ask(f"LOGIN {WHITELISTED} alice")
    assert_postfix_relay_denied(rcpt_reply(postfix_socketmap.smtp_port, STRANGER, REMOTE))
    for client in (STRANGER, WHITELISTED):
        assert rcpt_reply(postfix_socketmap.smtp_port, client, "postmaster@local.test") == (
            250,
            "2.1.5 Ok",
        )


@pytest.mark.parametrize("recipient", DISGUISED)
def test_postfix_disguised_relays_are_refused(
    postfix_socketmap: PostfixInstance,
    start_popauth: PopauthFactory,
    popauth_dir: Path,
    recipient: str,
) -> None:
    start_with_socketmap(start_popauth, popauth_dir)
    code, text = rcpt_reply(postfix_socketmap.smtp_port, STRANGER, recipient)
    assert code == 550, (code, text)
    assert "Relaying denied" in text, (code, text)


def test_postfix_sasl_client_relays_without_login(
    postfix_socketmap: PostfixInstance, start_popauth: PopauthFactory, popauth_dir: Path
) -> None:
    start_with_socketmap(start_popauth, popauth_dir)
    with SmtpSession(postfix_socketmap.smtp_port, STRANGER) as session:
        session.login("alice", USERS["alice"])
        assert session.mail()[0] == 250
        assert session.rcpt(REMOTE) == (250, "2.1.5 Ok")


def test_postfix_login_and_revoke_apply_to_the_next_lookup(
    postfix_socketmap: PostfixInstance, start_popauth: PopauthFactory, popauth_dir: Path
) -> None:
    popauth = start_with_socketmap(start_popauth, popauth_dir)
    client = "127.0.0.4"
    with SmtpSession(postfix_socketmap.smtp_port, client) as session:
        assert session.mail()[0] == 250
        assert_postfix_relay_denied(session.rcpt(REMOTE))
        popauth.ask(f"LOGIN {client} bob")
        assert session.rcpt(REMOTE) == (250, "2.1.5 Ok")
        popauth.ask(f"REVOKE {client}")
        assert_postfix_relay_denied(session.rcpt(REMOTE))
        popauth.ask(f"LOGIN ::ffff:{client} bob")  # the same key, mapped form
        assert session.rcpt(REMOTE) == (250, "2.1.5 Ok")


def test_postfix_popauth_stopped_means_4xx(
    postfix_socketmap: PostfixInstance, start_popauth: PopauthFactory, popauth_dir: Path
) -> None:
    popauth = start_with_socketmap(start_popauth, popauth_dir)
    popauth.ask(f"LOGIN {WHITELISTED} alice")
    assert rcpt_reply(postfix_socketmap.smtp_port, WHITELISTED, REMOTE)[0] == 250
    assert popauth.stop() == 0
    assert not socketmap_path(popauth_dir).exists()
    for client in (WHITELISTED, STRANGER):
        # Postfix reports a table it cannot reach as a configuration error.
        assert rcpt_reply(postfix_socketmap.smtp_port, client, REMOTE) == (
            451,
            f"4.3.5 <unknown[{client}]>: Client host rejected: Server configuration error",
        )
    # Mail to local domains never waits on popauth.
    assert rcpt_reply(postfix_socketmap.smtp_port, STRANGER, "postmaster@local.test")[0] == 250


def test_postfix_store_unavailable_means_4xx(
    postfix_socketmap: PostfixInstance,
    start_popauth: PopauthFactory,
    popauth_dir: Path,
    tmp_path: Path,
) -> None:
    with RedisInstance(root=tmp_path / "redis", port=free_port()) as redis:
        popauth = start_with_socketmap(
            start_popauth, popauth_dir, store="redis", redis_url=redis.url, redis_timeout=0.3
        )
        popauth.ask(f"LOGIN {WHITELISTED} alice")
        assert rcpt_reply(postfix_socketmap.smtp_port, WHITELISTED, REMOTE)[0] == 250
        redis.stop()
        assert lookup(socketmap_path(popauth_dir), WHITELISTED).startswith(b"TEMP ")
        for client in (WHITELISTED, STRANGER):
            assert rcpt_reply(postfix_socketmap.smtp_port, client, REMOTE) == (
                451,
                f"4.3.5 <unknown[{client}]>: Client host rejected: Server configuration error",
            )
        assert rcpt_reply(postfix_socketmap.smtp_port, STRANGER, "postmaster@local.test")[0] == 250
    assert "socketmap_store_unavailable" in {e["event"] for e in popauth.events()}
    # Postfix names popauth's TEMP reason in its log.
    assert "socketmap server temporary error: whitelist store unavailable" in (
        postfix_socketmap.log_text()
    )


def test_postfix_lookup_keys(
    postfix_socketmap: PostfixInstance, start_popauth: PopauthFactory, popauth_dir: Path
) -> None:
    """Only the address reaches popauth: the contrib pipemap holds back the
    client name ("unknown" here) that check_client_access looks up first."""
    popauth = start_with_socketmap(start_popauth, popauth_dir, log_level="debug")
    popauth.ask(f"LOGIN {WHITELISTED} alice")
    assert rcpt_reply(postfix_socketmap.smtp_port, WHITELISTED, REMOTE)[0] == 250
    assert rcpt_reply(postfix_socketmap.smtp_port, STRANGER, REMOTE)[0] == 550
    lookups = [
        (e["client_ip"], e["hit"]) for e in popauth.events() if e["event"] == "socketmap_lookup"
    ]
    assert lookups == [(WHITELISTED, True), (STRANGER, False)]
    assert popauth.stop() == 0
    (stopped,) = [e for e in popauth.events() if e["event"] == "socketmap_stopped"]
    # "unknown" once, from our readiness probe; none from Postfix (without the
    # pipemap it sent "unknown" once per RCPT as well).
    assert (stopped["hits"], stopped["misses"], stopped["not_an_address"]) == (1, 1, 1)
    assert stopped["perm"] == stopped["temp"] == 0


# --- Sendmail -------------------------------------------------------------


@pytest.fixture(scope="module")
def sendmail_socketmap(live_root: Path, popauth_dir: Path) -> Iterator[SendmailInstance]:
    assert os.geteuid() == 0, "the Sendmail live tests run as root (unshare, queue)"
    missing = [t for t in ("apt-get", "dpkg", "m4", "unshare") if not shutil.which(t)]
    assert not missing, f"missing tools: {missing}"
    root = ensure_sendmail_root(DEFAULT_CACHE_DIR)
    workdir = live_root / "sendmail-socketmap"
    port = free_port()
    mc = (
        mc_test_prelude(port, milter_socket="unix:/nonexistent/no-milter-here")
        + f"define(`POPAUTH_SOCKETMAP_SOCKET', `unix:{socketmap_path(popauth_dir)}')dnl\n"
        + SENDMAIL_MC.read_text()
        + mc_test_postlude(workdir)
    )
    instance = SendmailInstance(root, workdir, port, mc)
    instance.start()
    yield instance
    instance.stop()


def assert_sendmail_relay_denied(reply: tuple[int, str], recipient: str = REMOTE) -> None:
    code, text = reply
    assert code == 550, reply
    # Sendmail's own check_rcpt text (no reverse DNS here, hence the tail).
    assert text.startswith(f"5.7.1 <{recipient}>... Relaying denied."), reply


def test_sendmail_cf_keeps_its_own_relay_check(sendmail_socketmap: SendmailInstance) -> None:
    cf = sendmail_socketmap.cf_path.read_text()
    assert "promiscuous_relay" not in cf
    assert 'R$*\t\t\t$#error $@ 5.7.1 $: "550 Relaying denied' in cf
    assert re.search(r"^Kpopauth socket -T<TMPF> -d5s unix:/", cf, re.M), cf
    assert "SLocal_check_rcpt" in cf
    assert "Xpopauth" not in cf  # no milter in this door


def test_sendmail_whitelisted_relays_stranger_refused(
    sendmail_socketmap: SendmailInstance, start_popauth: PopauthFactory, popauth_dir: Path
) -> None:
    popauth = start_with_socketmap(start_popauth, popauth_dir)
    popauth.ask(f"LOGIN {WHITELISTED} alice")
    port = sendmail_socketmap.smtp_port
    with SmtpSession(port, WHITELISTED) as session:
        assert session.mail()[0] == 250
        assert session.rcpt(REMOTE) == (250, f"2.1.5 <{REMOTE}>... Recipient ok")
        assert session.send_message([REMOTE])[0] == 250
    assert_sendmail_relay_denied(rcpt_reply(port, STRANGER, REMOTE))
    for client in (STRANGER, WHITELISTED):
        assert rcpt_reply(port, client, "root@local.test")[0] == 250


@pytest.mark.parametrize("recipient", DISGUISED)
def test_sendmail_disguised_relays_are_refused(
    sendmail_socketmap: SendmailInstance,
    start_popauth: PopauthFactory,
    popauth_dir: Path,
    recipient: str,
) -> None:
    start_with_socketmap(start_popauth, popauth_dir)
    code, text = rcpt_reply(sendmail_socketmap.smtp_port, STRANGER, recipient)
    assert code == 550, (code, text)
    assert "Relaying denied" in text, (code, text)


def test_sendmail_login_and_revoke_apply_to_the_next_lookup(
    sendmail_socketmap: SendmailInstance, start_popauth: PopauthFactory, popauth_dir: Path
) -> None:
    popauth = start_with_socketmap(start_popauth, popauth_dir)
    client = "127.0.0.4"
    with SmtpSession(sendmail_socketmap.smtp_port, client) as session:
        assert session.mail()[0] == 250
        assert_sendmail_relay_denied(session.rcpt(REMOTE))
        popauth.ask(f"LOGIN {client} bob")
        assert session.rcpt(REMOTE)[0] == 250
        popauth.ask(f"REVOKE {client}")
        assert_sendmail_relay_denied(session.rcpt(REMOTE))


def test_sendmail_popauth_stopped_means_4xx(
    sendmail_socketmap: SendmailInstance, start_popauth: PopauthFactory, popauth_dir: Path
) -> None:
    popauth = start_with_socketmap(start_popauth, popauth_dir)
    popauth.ask(f"LOGIN {WHITELISTED} alice")
    port = sendmail_socketmap.smtp_port
    assert rcpt_reply(port, WHITELISTED, REMOTE)[0] == 250
    assert popauth.stop() == 0
    for client in (WHITELISTED, STRANGER):
        assert rcpt_reply(port, client, REMOTE) == (
            451,
            "4.3.0 Relay check unavailable, try again later",
        )
    assert rcpt_reply(port, STRANGER, "root@local.test")[0] == 250


def test_sendmail_store_unavailable_means_4xx(
    sendmail_socketmap: SendmailInstance,
    start_popauth: PopauthFactory,
    popauth_dir: Path,
    tmp_path: Path,
) -> None:
    port = sendmail_socketmap.smtp_port
    with RedisInstance(root=tmp_path / "redis", port=free_port()) as redis:
        popauth = start_with_socketmap(
            start_popauth, popauth_dir, store="redis", redis_url=redis.url, redis_timeout=0.3
        )
        popauth.ask(f"LOGIN {WHITELISTED} alice")
        assert rcpt_reply(port, WHITELISTED, REMOTE)[0] == 250
        redis.stop()
        assert rcpt_reply(port, WHITELISTED, REMOTE)[0] == 451
        assert rcpt_reply(port, STRANGER, "root@local.test")[0] == 250
