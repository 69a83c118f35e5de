"""Parsing ingest requests and formatting the server's replies.

What goes over the wire (verbs, limits, reply words) is defined once in
:mod:`popauth.doors.ingest.wire`, which the clients import too; this module adds
what only the server needs: parsing arguments into addresses and user names,
and formatting grants, usage and statistics.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from typing import NamedTuple

from popauth.basics.addresses import AddressError, IPAddress, parse_client_address
from popauth.basics.errors import InputError
from popauth.basics.escaping import escape_user_name
from popauth.basics.usernames import MAX_USER, is_valid_user_name
from popauth.doors.ingest.wire import (
    CAMPAIGN_VIEW,
    EXPLAIN_OPTIONS,
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
from popauth.localdelivery import is_mailer_name
from popauth.notices.ledger import NoticeHistory
from popauth.relay.decision import RelayBudget
from popauth.store import BudgetUse, Entry, Grant, StoreStats
from popauth.store.accounts import Graduation, Usage, Week, usage_counts

# The wire's names are re-exported: the server formats its replies from here.
__all__ = [
    "CAMPAIGN_VIEW",
    "MAX_LINE",
    "MULTI_LINE",
    "Argument",
    "ErrorCode",
    "ProtocolError",
    "Request",
    "Verb",
    "error",
    "format_campaign_user",
    "format_grant",
    "format_usage",
    "format_week",
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
    RECIPIENT = "recipient"


_ARGUMENTS: dict[Verb, tuple[Argument, ...]] = {
    Verb.LOGIN: (Argument.ADDRESS, Argument.OPTIONAL_USER),
    Verb.RENEW: (Argument.ADDRESS, Argument.USER),
    Verb.QUERY: (Argument.ADDRESS,),
    Verb.REVOKE: (Argument.ADDRESS,),
    Verb.REVOKEUSER: (Argument.USER,),
    Verb.BLOCK: (Argument.USER,),
    Verb.UNBLOCK: (Argument.USER,),
    Verb.REINSTATE: (Argument.USER,),
    Verb.EXPLAIN: (Argument.ADDRESS, Argument.RECIPIENT),
}
# The longest envelope address an EXPLAIN takes (RFC 5321 allows 256 with <>).
MAX_ADDRESS = 320


class ProtocolError(InputError):
    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Request(NamedTuple):
    """One parsed request (a named tuple: one is built for every request)."""

    verb: Verb
    address: IPAddress | None = None
    user: str = ""
    recipient: str = ""
    # ``key=value`` words after the arguments (EXPLAIN's), checked and in order.
    options: tuple[tuple[str, str], ...] = ()

    def option(self, name: str) -> str:
        return dict(self.options).get(name, "")


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
    grammar = _GRAMMARS.get(words[0].upper())
    if grammar is None:
        known = " ".join(v.value for v in Verb)
        raise ProtocolError(ErrorCode.SYNTAX, f"unknown verb; use one of {known}")
    verb, expected, required, known_options = grammar
    arguments = words[1:]
    if not required <= len(arguments) <= len(expected) + len(known_options):
        usage = " ".join(
            [verb.value, *(kind.value for kind in expected)]
            + [f"[{name}=...]" for name in known_options]
        )
        raise ProtocolError(ErrorCode.SYNTAX, f"usage: {usage}")
    address: IPAddress | None = None
    user = ""
    recipient = ""
    for kind, argument in zip(expected, arguments, strict=False):
        if kind is Argument.ADDRESS:
            address = _address(argument)
        elif kind is Argument.RECIPIENT:
            recipient = _envelope_address(argument, "recipient")
        else:
            user = _user(argument)
    if not known_options:
        # Only EXPLAIN takes options; the count above left no other words.
        return Request(verb, address, user, recipient)
    options = _options(arguments[len(expected) :], known_options)
    return Request(verb, address, user, recipient, options)


def _options(
    words: list[str], known: dict[str, Callable[[str], str]]
) -> tuple[tuple[str, str], ...]:
    found: dict[str, str] = {}
    for word in words:
        name, equals, value = word.partition("=")
        check = known.get(name)
        if not equals or check is None:
            names = " ".join(f"{option}=..." for option in known)
            raise ProtocolError(ErrorCode.SYNTAX, f"unknown option {word[:60]!r}; use {names}")
        if name in found:
            raise ProtocolError(ErrorCode.SYNTAX, f"option {name} given twice")
        found[name] = check(value)
    return tuple(found.items())


def _envelope_address(text: str, what: str) -> str:
    if not 0 < len(text) <= MAX_ADDRESS:
        raise ProtocolError(ErrorCode.SYNTAX, f"a {what} is 1 to {MAX_ADDRESS} characters")
    return text


def _sender(text: str) -> str:
    return _envelope_address(text, "sender")


def _mailer(text: str) -> str:
    if not is_mailer_name(text):
        raise ProtocolError(ErrorCode.SYNTAX, "a mailer is 1 to 64 letters, digits or _.+-")
    return text


def _address(text: str) -> IPAddress:
    try:
        return parse_client_address(text)
    except AddressError:
        raise ProtocolError(ErrorCode.ADDRESS, f"not an IP address: {text[:60]}") from None


def _user(text: str) -> str:
    if not is_valid_user_name(text):
        raise ProtocolError(ErrorCode.USER, f"user names are 1 to {MAX_USER} visible characters")
    return text


def _view(text: str) -> str:
    if text != CAMPAIGN_VIEW:
        raise ProtocolError(ErrorCode.SYNTAX, f"REPORT's only view is view={CAMPAIGN_VIEW}")
    return text


_OPTIONS: dict[Verb, dict[str, Callable[[str], str]]] = {
    Verb.EXPLAIN: dict(zip(EXPLAIN_OPTIONS, (_user, _user, _sender, _mailer), strict=True)),
    Verb.REPORT: {"view": _view},
}
# Per verb word: the verb, its arguments, how many are required, its options.
# One look-up per request instead of building an enum member and three.
_GRAMMARS: dict[str, tuple[Verb, tuple[Argument, ...], int, dict[str, Callable[[str], str]]]] = {
    verb.value: (
        verb,
        _ARGUMENTS.get(verb, ()),
        sum(kind is not Argument.OPTIONAL_USER for kind in _ARGUMENTS.get(verb, ())),
        _OPTIONS.get(verb, {}),
    )
    for verb in Verb
}


def format_grant(grant: Grant, described_address: str) -> str:
    return (
        f"address={described_address} user={escape_user_name(grant.user)} "
        f"granted={int(grant.granted_at)} expires={int(grant.expires_at)}"
    )


def format_entry(entry: Entry, described_address: str) -> str:
    """An entry as QUERY and REVOKE show it: the fields of its newest login
    (as before entries held several users), the expiry of the address, and
    ``users=`` every member, oldest login first, comma-separated."""
    return (
        f"address={described_address} user={escape_user_name(entry.user)} "
        f"granted={int(entry.granted_at)} expires={int(entry.expires_at)} "
        f"users={format_user_list(entry.users)}"
    )


def format_budget(budget: RelayBudget, use: BudgetUse) -> str:
    """QUERY's relay budget fields, after the entry's (old clients read past them):
    recipients left, the limit, and when the window ends (0: none is open)."""
    ends = 0 if use.ends_at is None else int(use.ends_at)
    left = max(budget.max_recipients - use.used, 0)
    return f"budget_left={left} budget_max={budget.max_recipients} budget_ends={ends}"


def format_user_list(users: Iterable[str]) -> str:
    """Names joined by commas; a comma or backslash in a name is escaped
    (``\\x2c``, ``\\x5c``), so that the list splits back unambiguously."""
    return ",".join(
        escape_user_name(user).replace("\\", "\\x5c").replace(",", "\\x2c") for user in users
    )


def format_usage(
    user: str, usage: Usage, graduation: Graduation | None = None, exempt: bool = False
) -> str:
    """A REPORT line: the usage, then ``graduated=`` and ``reinstated=`` (epoch
    seconds, 0: not) and ``exempt=yes|no`` (pop_first_exempt_users)."""
    fields = " ".join(f"{name}={int(value)}" for name, value in usage_counts(usage).items())
    graduated = 0 if graduation is None else int(graduation.graduated_at)
    reinstated = 0 if graduation is None else int(graduation.reinstated_at)
    return (
        f"user={escape_user_name(user)} {fields} graduated={graduated}"
        f" reinstated={reinstated} exempt={'yes' if exempt else 'no'}"
    )


def format_campaign_user(
    user: str,
    usage: Usage,
    graduation: Graduation | None,
    told: NoticeHistory | None,
    exempt: bool,
) -> str:
    """A ``REPORT view=campaign`` user line (times in epoch seconds, 0: never)."""
    graduated = 0 if graduation is None or not graduation.graduated else graduation.graduated_at
    return (
        f"user={escape_user_name(user)} pop_last_seen={int(usage.pop_last_seen)}"
        f" auth_last_seen={int(usage.auth_last_seen)}"
        f" notified={0 if told is None else int(told.last_sent_at)}"
        f" notices={0 if told is None else told.count}"
        f" graduated={int(graduated)} exempt={'yes' if exempt else 'no'}"
        f" refused_since_retirement={usage.retired_refusals}"
    )


def format_week(week: Week) -> str:
    """A ``REPORT view=campaign`` week line: distinct users of that ISO week."""
    return (
        f"week={week.week} pop_first={week.pop_first} smtp_auth={week.smtp_auth}"
        f" graduated={week.graduated} notified={week.notified}"
    )


def stats_fields(stats: StoreStats) -> str:
    return " ".join(f"{name}={value}" for name, value in stats.as_pairs())
