"""Netstrings and socketmap requests: the exact bytes, edge cases first."""

from __future__ import annotations

import pytest

from popauth.doors.socketmap import codec
from popauth.doors.socketmap.codec import NetstringError, RequestError, Status


def test_encode() -> None:
    assert codec.encode(b"popauth 192.0.2.1") == b"17:popauth 192.0.2.1,"
    assert codec.encode(b"") == b"0:,"


@pytest.mark.parametrize(
    ("buffer", "expected"),
    [
        (b"17:popauth 192.0.2.1,", (b"popauth 192.0.2.1", b"")),
        (b"3:abc,3:def,", (b"abc", b"3:def,")),
        (b"0:,", (b"", b"")),
        (b"1000:" + b"x" * 1000 + b",", (b"x" * 1000, b"")),
    ],
)
def test_decode(buffer: bytes, expected: tuple[bytes, bytes]) -> None:
    assert codec.decode(buffer) == expected


@pytest.mark.parametrize("buffer", [b"", b"1", b"17", b"17:", b"17:popauth", b"3:abc"])
def test_decode_needs_more(buffer: bytes) -> None:
    assert codec.decode(buffer) is None


@pytest.mark.parametrize(
    ("buffer", "problem"),
    [
        (b"3:abcX", "missing comma"),
        (b"3:abc;", "missing comma"),
        (b":abc,", "empty length"),
        (b"x:abc,", "not decimal"),
        (b"-1:,", "not decimal"),
        (b" 3:abc,", "not decimal"),
        (b"3 :abc,", "not decimal"),
        (b"popauth 192.0.2.1", "not decimal"),
        (b"03:abc,", "leading zeros"),
        (b"1001:", "longer than 1000"),
        (b"99999", "longer than 1000"),
        (b"123456789:", "longer than 1000"),
        ("٣:abc,".encode(), "not decimal"),
    ],
)
def test_decode_rejects(buffer: bytes, problem: str) -> None:
    with pytest.raises(NetstringError, match=problem):
        codec.decode(buffer)


def test_parse_length_limit_is_configurable() -> None:
    assert codec.parse_length(b"10", max_length=10) == 10
    with pytest.raises(NetstringError):
        codec.parse_length(b"11", max_length=10)
    assert codec.header_digits(1000) == 4


def test_parse_request() -> None:
    assert codec.parse_request(b"popauth 192.0.2.1") == codec.Request("popauth", "192.0.2.1")
    # The key is everything after the first space.
    assert codec.parse_request(b"popauth a b") == codec.Request("popauth", "a b")


@pytest.mark.parametrize(
    "payload", [b"", b"popauth", b"popauth ", b" 192.0.2.1", b"popauth \x00", b"popauth \xff"]
)
def test_bad_requests(payload: bytes) -> None:
    with pytest.raises(RequestError):
        codec.parse_request(payload)


def test_replies() -> None:
    assert codec.reply(Status.OK, "OK") == b"5:OK OK,"
    assert codec.reply(Status.NOTFOUND) == b"9:NOTFOUND ,"
    assert codec.reply(Status.TEMP, "store down") == b"15:TEMP store down,"
    assert codec.reply(Status.PERM, "bad\nthing") == b"14:PERM bad?thing,"
