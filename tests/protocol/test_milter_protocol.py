"""popauth serve, driven over its milter socket by an MTA-side client (miltertest)."""

from __future__ import annotations

import signal
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from miltertest import constants as mc

from harness.popauth import PopauthProcessError, PopauthServer
from tests.support.milter_mta import ACCEPT, CONTINUE, REPLY, Mta, is_relay_denied


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PopauthServer]:
    # Without a relay budget, a whitelisted message is settled at MAIL.
    with PopauthServer(
        tmp_path, trusted_networks=["192.0.2.0/24"], pop_first_max_recipients=""
    ) as running:
        yield running


@pytest.fixture
def mta(server: PopauthServer) -> Iterator[Mta]:
    session = Mta(server)
    yield session
    session.close()


def test_negotiates_away_every_unused_callback(mta: Mta) -> None:
    for unused in (mc.SMFIP_NOHELO, mc.SMFIP_NOHDRS, mc.SMFIP_NOEOH, mc.SMFIP_NOBODY):
        assert mta.protocol & unused
    assert mta.protocol & mc.SMFIP_NODATA
    assert mta.protocol & mc.SMFIP_NOUNKNOWN
    for used in (mc.SMFIP_NOCONNECT, mc.SMFIP_NOMAIL, mc.SMFIP_NORCPT):
        assert not mta.protocol & used
    # popauth changes no message: it asks for no modification actions.
    assert mta.actions == 0


def test_symbol_lists(server: PopauthServer) -> None:
    """With SETSYMLIST offered, popauth asks for exactly the macros it reads."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.settimeout(10)
        raw.connect(str(server.milter_path))
        body = struct.pack("!III", 6, mc.SMFI_V6_ACTS, mc.SMFI_V6_PROT)
        raw.sendall(struct.pack("!Ic", len(body) + 1, b"O") + body)
        length = struct.unpack("!I", raw.recv(4, socket.MSG_WAITALL))[0]
        reply = raw.recv(length, socket.MSG_WAITALL)
    assert reply[:1] == b"O"
    _, actions, _ = struct.unpack("!III", reply[1:13])
    assert actions == mc.SMFIF_SETSYMLIST
    lists, rest = {}, reply[13:]
    while rest:
        stage = struct.unpack("!I", rest[:4])[0]
        text, _, rest = rest[4:].partition(b"\0")
        lists[stage] = text.decode()
    assert lists == {
        mc.SMFIM_CONNECT: "{client_addr}",
        mc.SMFIM_ENVFROM: "{auth_authen}",
        mc.SMFIM_ENVRCPT: "{rcpt_mailer} {rcpt_addr} {rcpt_host}",
    }


def test_stranger_may_send_to_local_recipients_only(server: PopauthServer, mta: Mta) -> None:
    assert mta.connect("198.51.100.7")[0] == CONTINUE
    assert mta.mail()[0] == CONTINUE
    assert mta.rcpt("user@local.test", "local")[0] == CONTINUE
    assert is_relay_denied(mta.rcpt("user@remote.example", "smtp"))
    # An earlier local recipient must not open the door for later ones.
    assert mta.rcpt("other@local.test", "local")[0] == CONTINUE
    assert is_relay_denied(
        mta.rcpt("user%remote.example@local.test", "smtp", "user@remote.example")
    )
    decisions = server.events("relay_decision")
    assert [(d["recipient"], d["verdict"], d["reason"]) for d in decisions] == [
        ("<user@local.test>", "accept", "local_recipient"),
        ("<user@remote.example>", "reject", "relay_denied"),
        ("<other@local.test>", "accept", "local_recipient"),
        ("<user%remote.example@local.test>", "reject", "relay_denied"),
    ]
    assert {d["client_ip"] for d in decisions} == {"198.51.100.7"}


def test_recipient_without_mailer_macro_is_not_local(mta: Mta) -> None:
    mta.connect("198.51.100.7")
    mta.mail()
    assert is_relay_denied(mta.rcpt("user@local.test", None))


def test_trusted_network_is_accepted_at_connect(server: PopauthServer, mta: Mta) -> None:
    assert mta.connect("192.0.2.44")[0] == ACCEPT
    assert server.events("relay_decision")[-1]["reason"] == "trusted_network"


def test_authenticated_client_is_accepted_for_the_message(server: PopauthServer, mta: Mta) -> None:
    mta.connect("198.51.100.7")
    assert mta.mail(auth="alice")[0] == ACCEPT
    event = server.events("relay_decision")[-1]
    assert (event["reason"], event["user"], event["stage"]) == ("smtp_auth", "alice", "mail")


def test_whitelisted_client_is_accepted_for_the_message(server: PopauthServer, mta: Mta) -> None:
    assert server.ask("LOGIN 198.51.100.7 bob")[0].startswith("OK ")
    mta.connect("198.51.100.7")
    assert mta.mail()[0] == ACCEPT
    event = server.events("relay_decision")[-1]
    assert (event["reason"], event["user"]) == ("whitelisted", "bob")


def test_a_relay_budget_judges_each_recipient_and_tempfails_past_it(tmp_path: Path) -> None:
    with PopauthServer(tmp_path, pop_first_max_recipients=2) as server:
        server.ask("LOGIN 198.51.100.7 bob")
        session = Mta(server)
        session.connect("198.51.100.7")
        # Not settled at MAIL: every relayed recipient is counted at RCPT.
        assert session.mail()[0] == CONTINUE
        assert session.rcpt("one@remote.example", "smtp")[0] == CONTINUE
        assert session.rcpt("user@local.test", "local")[0] == CONTINUE
        assert session.rcpt("two@remote.example", "smtp")[0] == CONTINUE
        code, fields = session.rcpt("three@remote.example", "smtp")
        assert (code, fields["smtpcode"]) == (REPLY, "451")
        assert fields["text"].startswith("4.7.1 Too many recipients for a POP/IMAP login")
        # Local recipients are never counted nor refused for the budget.
        assert session.rcpt("other@local.test", "local")[0] == CONTINUE
        session.close()
        reasons = [(d["recipient"], d["reason"]) for d in server.events("relay_decision")]
        assert reasons == [
            ("<one@remote.example>", "whitelisted"),
            ("<user@local.test>", "whitelisted"),
            ("<two@remote.example>", "whitelisted"),
            ("<three@remote.example>", "budget_spent"),
            ("<other@local.test>", "whitelisted"),
        ]
        assert len(server.events("relay_budget_spent")) == 1


def test_revoke_applies_to_the_next_message_of_the_same_session(
    server: PopauthServer, mta: Mta
) -> None:
    server.ask("LOGIN 198.51.100.7 bob")
    mta.connect("198.51.100.7")
    assert mta.mail()[0] == ACCEPT
    server.ask("REVOKE 198.51.100.7")
    assert mta.mail()[0] == CONTINUE
    assert is_relay_denied(mta.rcpt("user@remote.example", "smtp"))


def test_abort_then_next_message(server: PopauthServer, mta: Mta) -> None:
    mta.connect("198.51.100.7")
    mta.mail()
    mta.abort()
    server.ask("LOGIN 198.51.100.7 bob")
    assert mta.mail()[0] == ACCEPT


def test_ipv4_mapped_and_tagged_client_addresses(server: PopauthServer) -> None:
    server.ask("LOGIN 198.51.100.7 bob")
    for address in ("::ffff:198.51.100.7", "IPv6:::ffff:198.51.100.7"):
        session = Mta(server)
        session.connect(address, family=mc.SMFIA_INET6)
        assert session.mail()[0] == ACCEPT
        session.close()


def test_connection_without_ip_address_is_never_whitelisted(server: PopauthServer) -> None:
    session = Mta(server)
    payload = b"localhost\0" + mc.SMFIA_UNKNOWN.encode()
    session.sock.sendall(struct.pack("!Ic", len(payload) + 1, b"C") + payload)
    assert session.milter.recv()[0] == CONTINUE
    assert session.mail()[0] == CONTINUE
    assert is_relay_denied(session.rcpt("user@remote.example", "smtp"))
    assert session.rcpt("user@local.test", "local")[0] == CONTINUE
    session.close()


def test_ipv6_prefix_and_custom_reject_message(tmp_path: Path) -> None:
    settings: dict[str, Any] = {
        "ipv6_prefix": 64,
        "reject_message": "See https://help.example/",
        "pop_first_max_recipients": "",
    }
    with PopauthServer(tmp_path, **settings) as server:
        server.ask("LOGIN 2001:db8:1:2::aaaa alice")
        session = Mta(server)
        session.connect("2001:db8:1:2::bbbb", family=mc.SMFIA_INET6)
        assert session.mail()[0] == ACCEPT
        session.close()
        session = Mta(server)
        session.connect("2001:db8:1:3::1", family=mc.SMFIA_INET6)
        session.mail()
        code, fields = session.rcpt("user@remote.example", "smtp")
        assert code == REPLY
        assert fields["text"] == "5.7.1 Relaying denied. See https://help.example/"
        session.close()


def test_sigterm_stops_cleanly_and_removes_sockets(tmp_path: Path) -> None:
    server = PopauthServer(tmp_path).start()
    assert server.process is not None
    server.process.send_signal(signal.SIGTERM)
    assert server.stop() == 0
    assert not server.milter_path.exists()
    assert not server.ingest_path.exists()
    assert server.events("stopped")


def test_bad_config_stops_start_with_the_key_named(tmp_path: Path) -> None:
    with pytest.raises(PopauthProcessError, match="'ttl'"):
        PopauthServer(tmp_path, ttl="soon").start()
