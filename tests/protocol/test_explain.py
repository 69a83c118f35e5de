"""``popauth explain`` against a running ``popauth serve``, checked against its milter.

Each case asks ``popauth explain`` (the command, over the ingest socket) and
then sends the same client and recipient through the milter socket as an
MTA would: the verdict and the reply text must be the milter's own.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.popauth import PopauthServer
from tests.support.milter_mta import ACCEPT, CONTINUE, REPLY, Mta
from tests.support.peers import ask_as, needs_root

REMOTE = "friend@remote.example"
LOCAL = "joe@local.test"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PopauthServer]:
    with PopauthServer(tmp_path) as served:
        yield served


def explain(server: PopauthServer, *arguments: str) -> dict[str, list[str]]:
    """The explanation's lines by label (``verdict``, ``reply``...)."""
    completed = server.cli("explain", *arguments)
    assert completed.returncode == 0, (completed.stdout, completed.stderr)
    lines: dict[str, list[str]] = {}
    for line in completed.stdout.splitlines():
        label, _, text = line.partition(": ")
        lines.setdefault(label, []).append(text)
    assert lines["verdict"] and lines["reply"] and lines["whitelist"] and lines["recipient"]
    return lines


def milter_reply(
    server: PopauthServer, address: str, recipient: str, mailer: str, auth: str | None = None
) -> str:
    """What the milter answers for this client and recipient: "accept at mail",
    "continue at rcpt" or the SMTP reply it has the MTA send."""
    session = Mta(server)
    try:
        assert session.connect(address)[0] == CONTINUE
        code, _ = session.mail(auth)
        if code == ACCEPT:
            return "accept at mail"
        code, fields = session.rcpt(recipient, mailer)
        if code == CONTINUE:
            return "continue at rcpt"
        assert code == REPLY
        return f"{fields['smtpcode']} {fields['text']}"
    finally:
        session.close()


def test_a_spent_relay_budget_is_explained_and_explain_spends_none(tmp_path: Path) -> None:
    with PopauthServer(tmp_path, pop_first_max_recipients=2) as server:
        assert server.cli("login", "192.0.2.10", "joe").returncode == 0
        for _ in range(3):
            lines = explain(server, "192.0.2.10", REMOTE)
            assert lines["budget"] == [
                "2 relayed recipients left (2 per 1 h); the next one opens a window"
            ]
        assert milter_reply(server, "192.0.2.10", REMOTE, "smtp") == "continue at rcpt"
        lines = explain(server, "192.0.2.10", REMOTE)
        assert lines["budget"][0].startswith("1 relayed recipients left (2 per 1 h), until ")
        assert milter_reply(server, "192.0.2.10", REMOTE, "smtp") == "continue at rcpt"
        lines = explain(server, "192.0.2.10", REMOTE)
        assert lines["verdict"] == ["tempfail (budget_spent), at RCPT TO, for this recipient"]
        assert lines["budget"][0].startswith(
            "spent (2 per 1 h): relayed recipients get 451 4.7.1 until "
        )
        assert lines["reply"] == [milter_reply(server, "192.0.2.10", REMOTE, "smtp")]
        assert lines["reply"][0].startswith("451 4.7.1 Too many recipients")
        # A local recipient is neither counted nor refused.
        lines = explain(server, "192.0.2.10", LOCAL)
        assert lines["verdict"] == ["accept (whitelisted), at RCPT TO, for this recipient"]
        assert lines["budget"][0].startswith("spent (2 per 1 h; local recipients are not counted)")
        assert milter_reply(server, "192.0.2.10", LOCAL, "local") == "continue at rcpt"


def test_a_stranger_may_send_to_a_local_recipient(server: PopauthServer) -> None:
    lines = explain(server, "198.51.100.7", LOCAL)
    assert lines["verdict"] == ["accept (local_recipient), at RCPT TO, for this recipient"]
    assert lines["recipient"][0].startswith(
        "joe@local.test is local: domain local.test [configured: local_domains],"
        " mailer local [configured: local_mailers]"
    )
    assert milter_reply(server, "198.51.100.7", LOCAL, "local") == "continue at rcpt"


def test_a_stranger_to_a_remote_recipient_was_never_granted(server: PopauthServer) -> None:
    lines = explain(server, "198.51.100.7", REMOTE)
    assert lines["verdict"] == ["reject (relay_denied), at RCPT TO, for this recipient"]
    assert lines["whitelist"][0].startswith(
        "198.51.100.7 has no entry: never granted since popauth started"
    )
    assert lines["recipient"][0].startswith(
        "friend@remote.example is relayed: remote.example is not a local domain"
    )
    assert lines["reply"] == [milter_reply(server, "198.51.100.7", REMOTE, "smtp")]
    assert lines["reply"][0].startswith("550 5.7.1 Relaying denied. Turn on SMTP AUTH")


def test_a_whitelisted_client_relays(server: PopauthServer) -> None:
    assert server.cli("login", "192.0.2.10", "joe").returncode == 0
    lines = explain(server, "192.0.2.10", REMOTE, "--user", "joe")
    assert lines["verdict"] == ["accept (whitelisted), at RCPT TO, for this recipient"]
    assert lines["whitelist"][0].startswith("192.0.2.10: joe logged in at ")
    assert "; the entry expires at " in lines["whitelist"][0]
    assert lines["user"] == ["joe is not blocked"]
    assert milter_reply(server, "192.0.2.10", REMOTE, "smtp") == "continue at rcpt"
    assert lines["budget"] == [
        "1000 relayed recipients left (1000 per 1 h); the next one opens a window"
    ]


def test_a_revoked_client_is_told_when(server: PopauthServer) -> None:
    assert server.cli("login", "192.0.2.11", "joe").returncode == 0
    assert server.cli("revoke", "192.0.2.11").returncode == 0
    lines = explain(server, "192.0.2.11", REMOTE)
    assert lines["verdict"][0].startswith("reject (relay_denied)")
    whitelist = lines["whitelist"][0]
    assert whitelist.startswith("192.0.2.11 has no entry: a REVOKE of the address removed it at ")
    assert "; it was joe's, from a login at " in whitelist
    assert lines["reply"] == [milter_reply(server, "192.0.2.11", REMOTE, "smtp")]


def test_a_blocked_user(server: PopauthServer) -> None:
    assert server.cli("login", "192.0.2.12", "mallory").returncode == 0
    assert server.cli("block", "mallory").returncode == 0
    lines = explain(server, "192.0.2.12", REMOTE, "--user", "mallory")
    assert "a REVOKEUSER or BLOCK of its user removed it" in lines["whitelist"][0]
    assert lines["user"] == [
        "mallory is blocked: their POP/IMAP logins are refused and whitelist nothing"
        " (popauth unblock mallory)"
    ]
    assert lines["reply"] == [milter_reply(server, "192.0.2.12", REMOTE, "smtp")]


def test_smtp_auth_relays_without_the_whitelist(server: PopauthServer) -> None:
    lines = explain(server, "198.51.100.8", REMOTE, "--auth", "joe", "--sender", "joe@local.test")
    assert lines["verdict"] == [
        "accept (smtp_auth), at MAIL FROM, for every recipient of the message"
    ]
    assert lines["whitelist"] == ["not consulted: the client authenticated with SMTP AUTH as joe"]
    assert lines["sender"][0].startswith("joe@local.test is not part of the decision")
    assert milter_reply(server, "198.51.100.8", REMOTE, "smtp", auth="joe") == "accept at mail"


def test_an_expired_entry_is_told_when(tmp_path: Path) -> None:
    with PopauthServer(tmp_path, ttl=1) as server:
        assert server.cli("login", "192.0.2.13", "joe").returncode == 0
        # The entry lives one second: ask until it is over (no guessed sleep).
        deadline = time.monotonic() + 15
        while True:
            lines = explain(server, "192.0.2.13", REMOTE)
            if lines["verdict"][0].startswith("reject") or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert lines["verdict"][0].startswith("reject (relay_denied)"), lines
        whitelist = lines["whitelist"][0]
        assert whitelist.startswith("192.0.2.13 has no entry: it expired at "), whitelist
        assert "; it was joe's, from a login at " in whitelist
        assert lines["reply"] == [milter_reply(server, "192.0.2.13", REMOTE, "smtp")]


@needs_root
def test_an_operator_may_explain_and_a_stranger_may_not(open_tmp: Path) -> None:
    with PopauthServer(open_tmp, ingest_operator_users=["daemon"]) as server:
        line = f"EXPLAIN 192.0.2.1 {REMOTE}"
        assert ask_as("daemon", server.ingest_path, line) == "OK count=4"
        assert ask_as("nobody", server.ingest_path, line).startswith("ERR forbidden only operators")
