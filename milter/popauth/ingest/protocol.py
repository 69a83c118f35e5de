"""The ingest line protocol, simple enough for a shell hook to speak.

A request is one line of UTF-8 ending in LF (CRLF is accepted), at most
:data:`MAX_LINE` bytes: a verb, case-insensitive, and its arguments separated
by blanks. Every reply line starts with one of three words:

``OK``        the request succeeded; ``key=value`` fields follow;
``NOTFOUND``  the address is not on the whitelist (QUERY, REVOKE);
``ERR``       the request failed and changed nothing; a code word and a
              human-readable reason follow.

``LIST``, ``BLOCKED`` and ``REPORT`` answer ``OK count=N`` followed by exactly
N lines.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from popauth.accounts import Usage
from popauth.addresses import AddressError, IPAddress, parse_client_address
from popauth.store import Grant, StoreStats
from popauth.usernames import MAX_USER, is_valid_user_name, printable_user_name

MAX_LINE = 512


class Verb(enum.Enum):
    LOGIN = "LOGIN"
    RENEW = "RENEW"
    QUERY = "QUERY"
    REVOKE = "REVOKE"
    REVOKEUSER = "REVOKEUSER"
    BLOCK = "BLOCK"
    UNBLOCK = "UNBLOCK"
    BLOCKED = "BLOCKED"
    REPORT = "REPORT"
    LIST = "LIST"
    STATS = "STATS"
    PING = "PING"
    QUIT = "QUIT"


# Who may use which verb: popauth.ingest.roles.
# Replies of these verbs are "OK count=N" and N more lines.
MULTI_LINE = frozenset({Verb.LIST, Verb.BLOCKED, Verb.REPORT})


class Argument(enum.Enum):
    ADDRESS = "address"
    OPTIONAL_USER = "[user]"
    USER = "user"


_ARGUMENTS: dict[Verb, tuple[Argument, ...]] = {
    Verb.LOGIN: (Argument.ADDRESS, Argument.OPTIONAL_USER),
    Verb.RENEW: (Argument.ADDRESS, Argument.USER),
    Verb.QUERY: (Argument.ADDRESS,),
    Verb.REVOKE: (Argument.ADDRESS,),
    Verb.REVOKEUSER: (Argument.USER,),
    Verb.BLOCK: (Argument.USER,),
    Verb.UNBLOCK: (Argument.USER,),
}


class ErrorCode(enum.Enum):
    SYNTAX = "syntax"
    ADDRESS = "address"
    USER = "user"
    FORBIDDEN = "forbidden"
    BLOCKED = "blocked"
    TOO_LONG = "too-long"
    TIMEOUT = "timeout"
    BUSY = "busy"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class ProtocolError(Exception):
    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Request:
    verb: Verb
    address: IPAddress | None = None
    user: str = ""


def parse_request(line: bytes) -> Request:
    """Parse one request line (with or without its line ending)."""
    if len(line) > MAX_LINE:
        raise ProtocolError(ErrorCode.TOO_LONG, f"request longer than {MAX_LINE} bytes")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(ErrorCode.SYNTAX, "request is not UTF-8") from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text.isprintable():
        raise ProtocolError(ErrorCode.SYNTAX, "control characters in request")
    words = text.split()
    if not words:
        raise ProtocolError(ErrorCode.SYNTAX, "empty request")
    try:
        verb = Verb(words[0].upper())
    except ValueError:
        known = " ".join(v.value for v in Verb)
        raise ProtocolError(ErrorCode.SYNTAX, f"unknown verb; use one of {known}") from None
    arguments = words[1:]
    expected = _ARGUMENTS.get(verb, ())
    required = [kind for kind in expected if kind is not Argument.OPTIONAL_USER]
    if not len(required) <= len(arguments) <= len(expected):
        usage = " ".join([verb.value, *(kind.value for kind in expected)])
        raise ProtocolError(ErrorCode.SYNTAX, f"usage: {usage}")
    address: IPAddress | None = None
    user = ""
    for kind, argument in zip(expected, arguments, strict=False):
        if kind is Argument.ADDRESS:
            address = _address(argument)
        else:
            user = _user(argument)
    return Request(verb, address, user)


def _address(text: str) -> IPAddress:
    try:
        return parse_client_address(text)
    except AddressError:
        raise ProtocolError(ErrorCode.ADDRESS, f"not an IP address: {text[:60]}") from None


def _user(text: str) -> str:
    if not is_valid_user_name(text):
        raise ProtocolError(ErrorCode.USER, f"user names are 1 to {MAX_USER} visible characters")
    return text


def format_grant(grant: Grant, described_address: str) -> str:
    return (
        f"address={described_address} user={printable_user_name(grant.user)} "
        f"granted={int(grant.granted_at)} expires={int(grant.expires_at)}"
    )


def ok(fields: str = "") -> bytes:
    return f"OK {fields}\n".encode() if fields else b"OK\n"


def not_found(described_address: str) -> bytes:
    return f"NOTFOUND address={described_address}\n".encode()


def not_found_user(user: str) -> bytes:
    return f"NOTFOUND user={user}\n".encode()


def format_usage(user: str, usage: Usage) -> str:
    fields = " ".join(f"{name}={int(value)}" for name, value in asdict(usage).items())
    return f"user={printable_user_name(user)} {fields}"


def error(code: ErrorCode, reason: str) -> bytes:
    return f"ERR {code.value} {reason}\n".encode()


def stats_fields(stats: StoreStats) -> str:
    return " ".join(f"{name}={value}" for name, value in stats.as_pairs())


def multi_line(lines: Iterable[str]) -> bytes:
    body = list(lines)
    return "".join([f"OK count={len(body)}\n", *(f"{line}\n" for line in body)]).encode()


def parse_fields(text: str) -> dict[str, str]:
    """Split ``key=value`` fields of a reply line (for clients)."""
    fields: dict[str, str] = {}
    for word in text.split():
        key, equals, value = word.partition("=")
        if equals:
            fields[key] = value
    return fields
