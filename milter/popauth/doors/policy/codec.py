"""Postfix's policy delegation protocol, requests and replies (pure: no sockets, no store).

A request (SMTPD_POLICY_README) is ``name=value`` lines, each ended by a
newline, and then an empty line; the reply is ``action=...`` and an empty
line. Postfix keeps the connection open for further requests.

SMTPD_POLICY_README says a policy server "should ignore any attributes
that it does not care about", and Postfix adds attributes in new releases:
so a name the door does not read is skipped, whatever its value, and a
Postfix upgrade never turns into deferred mail. What the door judges by is
parsed strictly: a line without ``=``, one of :data:`JUDGED_ATTRIBUTES`
given twice or holding a control character, or a request longer than
:data:`MAX_REQUEST` is refused (the door then answers a temporary failure,
never a permit).
"""

from __future__ import annotations

import re
from typing import NamedTuple

from popauth.basics.errors import InputError

# Longest request accepted, the empty line included. Postfix's requests are a
# few hundred bytes; its addresses are capped by line_length_limit (2048).
MAX_REQUEST = 16_384
_END = b"\n\n"

# The attributes the door reads; every other one is skipped.
JUDGED_ATTRIBUTES = frozenset(
    {
        "request",
        "protocol_state",
        "sender",
        "recipient",
        "client_address",
        "instance",
        "sasl_username",
    }
)
POLICY_REQUEST = "smtpd_access_policy"
_POLICY_REQUEST = POLICY_REQUEST.encode("ascii")
_JUDGED = frozenset(name.encode("ascii") for name in JUDGED_ATTRIBUTES)
# Control characters other than the newline that ends each line.
_CONTROL = re.compile(rb"[\x00-\x09\x0b-\x1f\x7f]")


class RequestTooLong(InputError):
    """No empty line within :data:`MAX_REQUEST` bytes: the stream is lost, close it."""


class RequestError(InputError):
    """A complete request that cannot be judged; framing survives."""


def split_first(
    buffer: bytes | bytearray, max_length: int = MAX_REQUEST
) -> tuple[bytes, int] | None:
    """The first request in ``buffer`` (its lines, without the empty line) and how
    many bytes it took; None when more bytes are needed."""
    if buffer.startswith(b"\n"):
        # An empty line with no attributes: a request of nothing.
        return b"", 1
    end = buffer.find(_END, 0, max_length)
    if end < 0:
        if len(buffer) >= max_length:
            raise RequestTooLong(f"no end of request within {max_length} bytes")
        return None
    return bytes(buffer[: end + 1]), end + 2


class Request(NamedTuple):
    """The attributes the door judges by (text; 8-bit bytes kept as surrogates)."""

    protocol_state: str
    client_address: str
    # None when not sent at all (which pop_first_sender = "own" refuses);
    # "" is the null sender.
    sender: str | None
    recipient: str
    sasl_username: str
    instance: str


def parse_request(payload: bytes) -> Request:
    """The attributes of one request's lines (each ended by a newline)."""
    if not payload:
        raise RequestError("empty request")
    attributes: dict[bytes, bytes] = {}
    for line in payload.split(b"\n")[:-1]:
        name, equals, value = line.partition(b"=")
        if not equals:
            raise RequestError("a line without '='")
        if name not in _JUDGED:
            continue
        if name in attributes:
            # Postfix never repeats one; which copy counts would be a guess.
            raise RequestError(f"attribute {_shown(_text(name))} given twice")
        if _CONTROL.search(value) is not None:
            raise RequestError(f"control character in {_shown(_text(name))}")
        attributes[name] = value
    if attributes.get(b"request") != _POLICY_REQUEST:
        raise RequestError(f"request must be {POLICY_REQUEST}")
    state = attributes.get(b"protocol_state")
    if not state:
        raise RequestError("no protocol_state")
    client = attributes.get(b"client_address")
    if not client:
        raise RequestError("no client_address")
    sender = attributes.get(b"sender")
    return Request(
        protocol_state=_text(state).upper(),
        client_address=_text(client),
        sender=None if sender is None else _text(sender),
        recipient=_text(attributes.get(b"recipient", b"")),
        sasl_username=_text(attributes.get(b"sasl_username", b"")),
        instance=_text(attributes.get(b"instance", b"")),
    )


def _text(raw: bytes) -> str:
    """Postfix sends the MTA's bytes: UTF-8 where valid, others as surrogates
    (as the milter door reads its macros)."""
    return raw.decode("utf-8", "surrogateescape")


def _shown(name: str) -> str:
    """An attribute name for a log line: printable, and short."""
    return "".join(c if c.isprintable() else "?" for c in name[:64])


def reply(action: str) -> bytes:
    """One reply: ``action=...`` and the empty line; the text printable ASCII."""
    clean = "".join(c if c.isprintable() and c.isascii() else "?" for c in action)
    return f"action={clean}\n\n".encode("ascii")
