"""Netstrings and the socketmap request/reply format (pure: no sockets, no store).

The socketmap protocol (Postfix socketmap_table(5), Sendmail's ``socket`` map
class) frames every request and reply as a netstring, ``LEN:DATA,`` with LEN
in decimal ASCII without leading zeros. A request is ``NAME KEY``; a reply is
``OK value``, ``NOTFOUND `` (with its space), ``TEMP reason``, ``TIMEOUT
reason`` or ``PERM reason``.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from popauth.basics.errors import InputError

# Longest request payload accepted. Postfix and Sendmail send ``NAME KEY`` with
# a host name or an address as the key, far below this.
MAX_REQUEST = 1000


class NetstringError(InputError):
    """The bytes are not a well-formed netstring (or exceed the limit).

    The stream's framing is lost after one: the connection must be closed.
    """


class RequestError(InputError):
    """A well-framed request that makes no sense (``PERM``); framing survives."""


def encode(payload: bytes) -> bytes:
    return b"%d:%s," % (len(payload), payload)


def header_digits(max_length: int) -> int:
    """How many length digits a netstring of at most ``max_length`` bytes has."""
    return len(str(max_length))


def parse_length(digits: bytes, max_length: int = MAX_REQUEST) -> int:
    """The payload length from the digits before the colon."""
    if not digits:
        raise NetstringError("empty length")
    if not digits.isdigit() or not digits.isascii():
        raise NetstringError("length is not decimal digits")
    if len(digits) > 1 and digits.startswith(b"0"):
        raise NetstringError("length has leading zeros")
    if len(digits) > header_digits(max_length):
        raise NetstringError(f"longer than {max_length} bytes")
    length = int(digits)
    if length > max_length:
        raise NetstringError(f"longer than {max_length} bytes")
    return length


def decode(buffer: bytes, max_length: int = MAX_REQUEST) -> tuple[bytes, bytes] | None:
    """Split the first netstring off ``buffer``: ``(payload, rest)``.

    None when more bytes are needed; :class:`NetstringError` when the bytes
    can never become a valid netstring.
    """
    split = split_first(buffer, max_length)
    if split is None:
        return None
    payload, used = split
    return payload, bytes(buffer[used:])


def split_first(
    buffer: bytes | bytearray, max_length: int = MAX_REQUEST
) -> tuple[bytes, int] | None:
    """The first netstring's payload in ``buffer`` and how many bytes it took.

    As :func:`decode`, without copying the rest: a server reads requests
    from its own buffer.
    """
    width = header_digits(max_length)
    colon = buffer.find(b":", 0, width + 1)
    if colon < 0:
        if len(buffer) > width or (buffer and not buffer.isdigit()):
            # Let parse_length name the problem.
            parse_length(bytes(buffer[: width + 1]), max_length)
        return None
    length = parse_length(bytes(buffer[:colon]), max_length)
    end = colon + 1 + length
    if len(buffer) <= end:
        return None
    if buffer[end] != 0x2C:  # ","
        raise NetstringError("missing comma after the payload")
    return bytes(buffer[colon + 1 : end]), end + 1


class Request(NamedTuple):
    """``NAME KEY`` (a named tuple: one is built for every lookup)."""

    name: str
    key: str


def parse_request(payload: bytes) -> Request:
    """``NAME KEY`` from a netstring payload (the key may hold spaces)."""
    try:
        text = payload.decode("ascii")
    except UnicodeDecodeError:
        raise RequestError("request is not ASCII") from None
    if not text.isprintable():
        raise RequestError("control characters in request")
    name, space, key = text.partition(" ")
    if not name or not space:
        raise RequestError("request must be NAME KEY")
    if not key:
        raise RequestError("empty key")
    return Request(name, key)


class Status(enum.Enum):
    OK = "OK"
    NOTFOUND = "NOTFOUND"
    TEMP = "TEMP"
    TIMEOUT = "TIMEOUT"
    PERM = "PERM"


def reply(status: Status, text: str = "") -> bytes:
    """One reply netstring. ``NOTFOUND`` always carries its trailing space."""
    clean = "".join(c if c.isprintable() else "?" for c in text)
    return encode(f"{status.value} {clean}".encode("ascii", "replace"))
