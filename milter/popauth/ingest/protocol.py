"""Parsing ingest requests and formatting the server's replies.

What goes over the wire (verbs, limits, reply words) is defined once in
:mod:`popauth.ingest.wire`, which the clients import too; this module adds
what only the server needs: parsing arguments into addresses and user names,
and formatting grants, usage and statistics.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass

from popauth.accounts import Usage
from popauth.addresses import AddressError, IPAddress, parse_client_address
from popauth.ingest.wire import (
    MAX_LINE,
    MULTI_LINE,
    ErrorCode,
    Verb,
    error,
    multi_line,
    not_found,
    not_found_user,
    ok,
    parse_fields,
)
from popauth.store import Grant, StoreStats
from popauth.usernames import MAX_USER, is_valid_user_name, printable_user_name

# The wire's names are re-exported: the server formats its replies from here.
__all__ = [
    "MAX_LINE",
    "MULTI_LINE",
    "Argument",
    "ErrorCode",
    "ProtocolError",
    "Request",
    "Verb",
    "error",
    "format_grant",
    "format_usage",
    "multi_line",
    "not_found",
    "not_found_user",
    "ok",
    "parse_fields",
    "parse_request",
    "stats_fields",
]


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


def format_usage(user: str, usage: Usage) -> str:
    fields = " ".join(f"{name}={int(value)}" for name, value in asdict(usage).items())
    return f"user={printable_user_name(user)} {fields}"


def stats_fields(stats: StoreStats) -> str:
    return " ".join(f"{name}={value}" for name, value in stats.as_pairs())
