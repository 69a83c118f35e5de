"""The ingest protocol on the wire: its verbs, limits and reply forms, once.

A request is one line of UTF-8 ending in LF (CRLF is accepted), at most
:data:`MAX_LINE` bytes: a verb, case-insensitive, and its arguments separated
by blanks. Every reply line starts with one of three words:

``OK``        the request succeeded; ``key=value`` fields follow;
``NOTFOUND``  the address or user is not there (QUERY, REVOKE, UNBLOCK,
              REINSTATE);
``ERR``       the request failed and changed nothing; a code word and a
              human-readable reason follow. One code is the exception:
              ``ERR incomplete`` says a block, unblock or revoke is in force
              but not everywhere it should be (not confirmed by the Redis
              replicas, or a block whose revocations failed); its reason
              says what holds, and repeating the request is safe.

``LIST``, ``BLOCKED``, ``REPORT`` and ``EXPLAIN`` answer ``OK count=N``
followed by exactly N lines.

A client may pipeline: send several requests before reading any reply. The
replies come back in the order of the requests, exactly one each. Up to
:data:`RENEW_BATCH` consecutive ``RENEW`` requests that have arrived are
applied in one step (one store call, e.g. one Redis script), each still on
its own terms and with its own reply.

Standard library only: the client (``popauth login`` runs inside every POP
login), the CLI and the server all import it. The Dovecot hook runs on the
system Python without popauth installed, so it keeps its own copies of what
it needs; a test checks that they are equal.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable

# Where popauth listens by default, and where its clients look.
DEFAULT_SOCKET = "/run/popauth/ingest.sock"
# The longest request line, in bytes, line ending included.
MAX_LINE = 512
# The most pipelined RENEW requests the endpoint applies in one step, and
# how many ``popauth sessions`` sends before reading their replies.
RENEW_BATCH = 500


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
    EXPLAIN = "EXPLAIN"
    # Undo a user's graduation to SMTP AUTH (pop_first_graduate).
    REINSTATE = "REINSTATE"


# Replies of these verbs are "OK count=N" and N more lines.
MULTI_LINE = frozenset({Verb.LIST, Verb.BLOCKED, Verb.REPORT, Verb.EXPLAIN})
# EXPLAIN's optional ``key=value`` words, after its address and recipient.
EXPLAIN_OPTIONS = ("user", "auth", "sender", "mailer")


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
    # In force, but not confirmed everywhere: the only ERR that changed something.
    INCOMPLETE = "incomplete"
    INTERNAL = "internal"


# The first word of every reply line.
OK = "OK"
NOT_FOUND = "NOTFOUND"
ERR = "ERR"
# How a multi-line reply announces its length.
COUNT_PREFIX = f"{OK} count="
# A busy endpoint's refusal: a client may retry once, later.
BUSY_PREFIX = f"{ERR} {ErrorCode.BUSY.value}"


# C0 controls, DEL and C1 controls: in a request a line break could smuggle
# in a second one; the settings refuse them in every string as well.
CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f-\x9f]")


def has_control_characters(text: str) -> bool:
    """C0, DEL or C1 controls: a line break could smuggle in a second request."""
    return CONTROL_CHARACTER.search(text) is not None


def reply_status(line: str) -> tuple[str, ErrorCode | None]:
    """A reply line's first word (OK, NOTFOUND, ERR), and an ERR line's code."""
    status, _, rest = line.partition(" ")
    if status != ERR:
        return status, None
    word = rest.partition(" ")[0]
    return status, next((code for code in ErrorCode if code.value == word), None)


def is_multi_line(request: str) -> bool:
    """Whether the reply to ``request`` is ``OK count=N`` and N more lines."""
    verb = request.split(" ", 1)[0].upper()
    return any(verb == multi.value for multi in MULTI_LINE)


def announced_count(first_line: str) -> int | None:
    """N of an ``OK count=N`` line; None for any other reply."""
    if not first_line.startswith(COUNT_PREFIX):
        return None
    return int(first_line.removeprefix(COUNT_PREFIX))


def ok(fields: str = "") -> bytes:
    return f"{OK} {fields}\n".encode() if fields else f"{OK}\n".encode()


def not_found(described_address: str) -> bytes:
    return f"{NOT_FOUND} address={described_address}\n".encode()


def not_found_user(user: str) -> bytes:
    return f"{NOT_FOUND} user={user}\n".encode()


def error(code: ErrorCode, reason: str) -> bytes:
    return f"{ERR} {code.value} {reason}\n".encode()


def multi_line(lines: Iterable[str]) -> bytes:
    body = list(lines)
    return "".join([f"{COUNT_PREFIX}{len(body)}\n", *(f"{line}\n" for line in body)]).encode()


def parse_fields(text: str) -> dict[str, str]:
    """Split ``key=value`` fields of a reply line (for clients)."""
    fields: dict[str, str] = {}
    for word in text.split():
        key, equals, value = word.partition("=")
        if equals:
            fields[key] = value
    return fields
