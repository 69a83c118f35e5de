"""Postfix policy requests and replies, without sockets."""

from __future__ import annotations

import pytest

from popauth.doors.policy import codec
from popauth.doors.policy.codec import RequestError, RequestTooLong

RCPT = (
    b"request=smtpd_access_policy\n"
    b"protocol_state=RCPT\n"
    b"protocol_name=ESMTP\n"
    b"client_address=192.0.2.7\n"
    b"client_name=unknown\n"
    b"helo_name=client.example\n"
    b"sender=alice@local.test\n"
    b"recipient=someone@remote.example\n"
    b"recipient_count=0\n"
    b"instance=1a2b.5f3c.9d0e.0\n"
    b"sasl_username=\n"
    b"size=0\n"
)


def test_a_request_ends_at_the_empty_line() -> None:
    buffer = RCPT + b"\n" + b"request=smtpd"
    payload, used = codec.split_first(buffer) or (b"", 0)
    assert payload == RCPT
    assert buffer[used:] == b"request=smtpd"


def test_an_incomplete_request_needs_more_bytes() -> None:
    assert codec.split_first(RCPT) is None
    assert codec.split_first(b"") is None


def test_a_lone_empty_line_is_an_empty_request() -> None:
    assert codec.split_first(b"\nrest") == (b"", 1)
    with pytest.raises(RequestError, match="empty request"):
        codec.parse_request(b"")


def test_a_request_without_an_end_in_sight_is_too_long() -> None:
    with pytest.raises(RequestTooLong):
        codec.split_first(b"sender=" + b"x" * codec.MAX_REQUEST)
    # Below the limit it may still end.
    assert codec.split_first(b"sender=" + b"x" * 100) is None


def test_the_attributes_the_door_judges_by() -> None:
    request = codec.parse_request(RCPT)
    assert request == codec.Request(
        protocol_state="RCPT",
        client_address="192.0.2.7",
        sender="alice@local.test",
        recipient="someone@remote.example",
        sasl_username="",
        instance="1a2b.5f3c.9d0e.0",
    )


def test_the_null_sender_is_empty_and_a_missing_sender_unknown() -> None:
    null = codec.parse_request(RCPT.replace(b"sender=alice@local.test", b"sender="))
    assert null.sender == ""
    missing = codec.parse_request(RCPT.replace(b"sender=alice@local.test\n", b""))
    assert missing.sender is None


def test_eight_bit_values_are_kept_losslessly() -> None:
    request = codec.parse_request(RCPT.replace(b"alice@local.test", b"j\xc3\xb6rg@local.test\xff"))
    assert request.sender is not None
    assert request.sender.encode("utf-8", "surrogateescape") == b"j\xc3\xb6rg@local.test\xff"


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        (RCPT + b"no equals sign\n", "without '='"),
        (RCPT + b"sender=mallory@remote.example\n", "given twice"),
        (RCPT + b"client_address=192.0.2.8\n", "given twice"),
        (RCPT.replace(b"sender=alice@local.test", b"sender=a\rb@local.test"), "control character"),
        (RCPT.replace(b"client_address=192.0.2.7", b"client_address=192.0.2.7\x00"), "control"),
        (RCPT.replace(b"request=smtpd_access_policy", b"request=other"), "smtpd_access_policy"),
        (RCPT.replace(b"request=smtpd_access_policy\n", b""), "smtpd_access_policy"),
        (RCPT.replace(b"client_address=192.0.2.7\n", b""), "no client_address"),
        (RCPT.replace(b"client_address=192.0.2.7", b"client_address="), "no client_address"),
        (RCPT.replace(b"protocol_state=RCPT\n", b""), "no protocol_state"),
    ],
)
def test_requests_that_cannot_be_judged_are_refused(payload: bytes, problem: str) -> None:
    with pytest.raises(RequestError, match=problem):
        codec.parse_request(payload)


def test_attributes_the_door_does_not_read_are_skipped_whatever_they_hold() -> None:
    """SMTPD_POLICY_README: ignore what you do not care about. A newer Postfix's
    new attribute, a repeated one or an odd byte in one never defers mail."""
    plain = codec.parse_request(RCPT)
    more = RCPT + b"x_attribute_of_a_newer_postfix=1\n\xffname=\x01\nhelo_name=a\rb\nhelo_name=c\n"
    assert codec.parse_request(more) == plain


def test_replies_are_one_action_and_the_empty_line() -> None:
    assert codec.reply("OK") == b"action=OK\n\n"
    assert codec.reply("550 5.7.1 Relaying denied.") == b"action=550 5.7.1 Relaying denied.\n\n"
    # A newline in a text can never end the reply early or add an action.
    assert codec.reply("451 x\n\naction=OK") == b"action=451 x??action=OK\n\n"
    assert codec.reply("451 caf\xe9") == b"action=451 caf?\n\n"
