from __future__ import annotations

import pytest

from popauth.basics.addresses import parse_client_address
from popauth.doors.ingest.protocol import (
    MAX_LINE,
    ErrorCode,
    ProtocolError,
    Request,
    Verb,
    multi_line,
    parse_fields,
    parse_request,
)


@pytest.mark.parametrize(
    ("line", "request_"),
    [
        (
            b"LOGIN 192.0.2.1 alice\n",
            Request(Verb.LOGIN, parse_client_address("192.0.2.1"), "alice"),
        ),
        (b"login 192.0.2.1\r\n", Request(Verb.LOGIN, parse_client_address("192.0.2.1"))),
        (
            b"LOGIN ::ffff:192.0.2.1 bob@example.org\n",
            Request(Verb.LOGIN, parse_client_address("192.0.2.1"), "bob@example.org"),
        ),
        (
            "LOGIN 192.0.2.1 jürgen\n".encode(),
            Request(Verb.LOGIN, parse_client_address("192.0.2.1"), "jürgen"),
        ),
        (
            b"  QUERY   IPv6:2001:db8::1  \n",
            Request(Verb.QUERY, parse_client_address("2001:db8::1")),
        ),
        (b"REVOKE 192.0.2.1\n", Request(Verb.REVOKE, parse_client_address("192.0.2.1"))),
        (b"LIST\n", Request(Verb.LIST)),
        (
            b"renew ::ffff:192.0.2.1 alice\n",
            Request(Verb.RENEW, parse_client_address("192.0.2.1"), "alice"),
        ),
        (b"stats\n", Request(Verb.STATS)),
        (b"PING", Request(Verb.PING)),
        (b"QUIT\n", Request(Verb.QUIT)),
        (
            b"EXPLAIN 192.0.2.1 bob@remote.test\n",
            Request(Verb.EXPLAIN, parse_client_address("192.0.2.1"), recipient="bob@remote.test"),
        ),
        (
            b"explain 192.0.2.1 <> mailer=lmtp auth=joe sender=<> user=ann\n",
            Request(
                Verb.EXPLAIN,
                parse_client_address("192.0.2.1"),
                recipient="<>",
                options=(("mailer", "lmtp"), ("auth", "joe"), ("sender", "<>"), ("user", "ann")),
            ),
        ),
        (
            # A recipient may hold "=" (SRS): only words after it are options.
            b"EXPLAIN 192.0.2.1 SRS0=ab=cd=x.test=u@y.test\n",
            Request(
                Verb.EXPLAIN,
                parse_client_address("192.0.2.1"),
                recipient="SRS0=ab=cd=x.test=u@y.test",
            ),
        ),
    ],
)
def test_parse(line: bytes, request_: Request) -> None:
    assert parse_request(line) == request_


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"\n", ErrorCode.SYNTAX),
        (b"HELLO\n", ErrorCode.SYNTAX),
        (b"LOGIN\n", ErrorCode.SYNTAX),
        (b"LOGIN 192.0.2.1 alice extra\n", ErrorCode.SYNTAX),
        (b"LIST everything\n", ErrorCode.SYNTAX),
        (b"EXPLAIN 192.0.2.1\n", ErrorCode.SYNTAX),
        (b"EXPLAIN bob@remote.test 192.0.2.1\n", ErrorCode.ADDRESS),
        (b"EXPLAIN 192.0.2.1 bob@remote.test colour=blue\n", ErrorCode.SYNTAX),
        (b"EXPLAIN 192.0.2.1 bob@remote.test user\n", ErrorCode.SYNTAX),
        (b"EXPLAIN 192.0.2.1 bob@remote.test user=a user=b\n", ErrorCode.SYNTAX),
        (b"EXPLAIN 192.0.2.1 bob@remote.test user=\n", ErrorCode.USER),
        (b"EXPLAIN 192.0.2.1 bob@remote.test mailer=a/b\n", ErrorCode.SYNTAX),
        (b"EXPLAIN 192.0.2.1 bob@remote.test sender=" + b"x" * 321 + b"\n", ErrorCode.SYNTAX),
        (b"RENEW 192.0.2.1\n", ErrorCode.SYNTAX),  # whose session: the user is required
        (b"RENEW 192.0.2.1 alice bob\n", ErrorCode.SYNTAX),
        (b"RENEW 192.0.2.1 \xc2\x85alice\n", ErrorCode.SYNTAX),
        (b"RENEW localhost alice\n", ErrorCode.ADDRESS),
        (b"LOGIN not-an-ip alice\n", ErrorCode.ADDRESS),
        (b"LOGIN 192.0.2.0/24 alice\n", ErrorCode.ADDRESS),
        (b"LOGIN 192.0.2.1 " + b"u" * 300 + b"\n", ErrorCode.USER),
        (b"LOGIN 192.0.2.1 al\x00ice\n", ErrorCode.SYNTAX),
        (b"LOGIN 192.0.2.1 \xff\xfe\n", ErrorCode.SYNTAX),
        (b"PING" + b" " * MAX_LINE + b"\n", ErrorCode.TOO_LONG),
    ],
)
def test_parse_errors(line: bytes, code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as raised:
        parse_request(line)
    assert raised.value.code is code


def test_multi_line_replies_are_counted() -> None:
    assert multi_line(["a=1", "b=2"]) == b"OK count=2\na=1\nb=2\n"
    assert multi_line([]) == b"OK count=0\n"


def test_parse_fields() -> None:
    assert parse_fields("address=192.0.2.1 user= expires=5") == {
        "address": "192.0.2.1",
        "user": "",
        "expires": "5",
    }
