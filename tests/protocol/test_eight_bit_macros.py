"""Issue 11, defect 6: 8-bit macros and envelope arguments from the MTA.

pymilter's getsymval decoded macros as strict UTF-8, so a Latin-1
``{auth_authen}``, ``{rcpt_addr}`` or ``{rcpt_mailer}`` raised inside it and
every attempt got a 451. These tests send the raw bytes over the milter
protocol to ``popauth serve``; the verdict must be the one the bytes call for.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from miltertest import constants as mc

from harness.popauth import PopauthServer
from tests.support.milter_mta import CONTINUE, Mta, is_relay_denied

LATIN1_USER = "jörg".encode("latin-1")  # b"j\xf6rg": not UTF-8


def packet(command: bytes, payload: bytes) -> bytes:
    return struct.pack("!I", len(payload) + 1) + command + payload


def macros(stage: bytes, **values: bytes) -> bytes:
    body = b"".join(name.encode() + b"\0" + value + b"\0" for name, value in values.items())
    return packet(b"D", stage + body)


class RawMta(Mta):
    """An MTA that sends macro values and envelope arguments as raw bytes."""

    def reply(self) -> tuple[str, dict[str, Any]]:
        return self.milter.recv()  # type: ignore[no-any-return]

    def raw_mail(self, sender: bytes, auth: bytes | None = None) -> tuple[str, dict[str, Any]]:
        if auth is not None:
            self.sock.sendall(macros(b"M", **{"{auth_authen}": auth}))
        self.sock.sendall(packet(b"M", sender + b"\0"))
        return self.reply()

    def raw_rcpt(
        self, address: bytes, mailer: bytes, resolved: bytes | None = None
    ) -> tuple[str, dict[str, Any]]:
        values = {"{rcpt_mailer}": mailer, "{rcpt_addr}": resolved or address.strip(b"<>")}
        self.sock.sendall(macros(b"R", **values))
        self.sock.sendall(packet(b"R", address + b"\0"))
        return self.reply()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PopauthServer]:
    with PopauthServer(tmp_path) as running:
        yield running


@pytest.fixture
def mta(server: PopauthServer) -> Iterator[RawMta]:
    session = RawMta(server)
    session.connect("198.51.100.7")
    yield session
    session.close()


def is_tempfail(reply: tuple[str, dict[str, Any]]) -> bool:
    code, fields = reply
    return code == mc.SMFIR_TEMPFAIL or (
        code == mc.SMFIR_REPLYCODE and str(fields["smtpcode"]).startswith("4")
    )


def test_latin1_smtp_auth_user_relays(server: PopauthServer, mta: RawMta) -> None:
    reply = mta.raw_mail(b"<sender@example.org>", auth=LATIN1_USER)
    assert reply[0] == mc.SMFIR_ACCEPT, reply
    event = server.events("relay_decision")[-1]
    assert (event["reason"], event["user"]) == ("smtp_auth", "j\\xf6rg")
    assert server.events("milter_callback_failed") == []


def test_latin1_local_recipient_is_accepted(server: PopauthServer, mta: RawMta) -> None:
    assert mta.raw_mail(b"<sender@example.org>")[0] == CONTINUE
    reply = mta.raw_rcpt(b"<" + LATIN1_USER + b"@local.test>", b"local")
    assert reply[0] == CONTINUE, reply
    event = server.events("relay_decision")[-1]
    assert (event["reason"], event["rcpt_addr"]) == ("local_recipient", "j\\xf6rg@local.test")


def test_latin1_remote_recipient_is_refused_not_tempfailed(mta: RawMta) -> None:
    mta.raw_mail(b"<sender@example.org>")
    reply = mta.raw_rcpt(b"<" + LATIN1_USER + b"@remote.example>", b"smtp")
    assert is_relay_denied(reply), reply


def test_latin1_mailer_never_counts_as_local(mta: RawMta) -> None:
    mta.raw_mail(b"<sender@example.org>")
    reply = mta.raw_rcpt(b"<user@local.test>", "locál".encode("latin-1"))
    assert is_relay_denied(reply), reply


def test_latin1_resolved_address_in_a_remote_domain_is_refused(mta: RawMta) -> None:
    # The envelope looks local; the MTA resolved it elsewhere (8-bit bytes).
    mta.raw_mail(b"<sender@example.org>")
    reply = mta.raw_rcpt(b"<user@local.test>", b"local", b"user@r\xe9mote.example")
    assert is_relay_denied(reply), reply


def test_latin1_envelope_sender_and_recipient(server: PopauthServer, mta: RawMta) -> None:
    assert mta.raw_mail(b"<" + LATIN1_USER + b"@example.org>")[0] == CONTINUE
    assert mta.raw_rcpt(b"<" + LATIN1_USER + b"@local.test>", b"local")[0] == CONTINUE
    assert is_relay_denied(mta.raw_rcpt(b"<" + LATIN1_USER + b"@remote.example>", b"smtp"))
    recipients = [event["recipient"] for event in server.events("relay_decision")]
    assert recipients == ["<j\\xf6rg@local.test>", "<j\\xf6rg@remote.example>"]
