"""Text from outside shown safely: every character a terminal or a reader
could take for something else becomes a visible backslash escape.

Recipient addresses, user names and client-supplied errors reach the logs
and the command line. A raw ESC sequence there repaints an operator's
terminal, a line break forges a log line, and a byte that is not UTF-8
(kept by the milter as a surrogate escape) cannot be printed at all.
"""

from __future__ import annotations

import re

from popauth.basics.usernames import is_valid_user_name

# C0 controls, the backslash itself (so that every escape is unambiguous),
# DEL, C1 controls, surrogates (bytes that were not UTF-8), the Unicode line
# and paragraph separators, and the bidirectional overrides and isolates that
# reorder what a reader sees.
_UNSAFE = re.compile("[\x00-\x1f\\\\\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_SHORT = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    character = match.group()
    short = _SHORT.get(character)
    if short is not None:
        return short
    code = ord(character)
    if 0xDC80 <= code <= 0xDCFF:
        # A byte the MTA sent that was not UTF-8 (see popauth.doors.milter.macros.as_text).
        return f"\\x{code - 0xDC00:02x}"
    return _code_point(code)


def _code_point(code: int) -> str:
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def escape_text(text: str) -> str:
    """``text`` with every unsafe character as a backslash escape; safe text unchanged."""
    if _UNSAFE.search(text) is None:
        return text
    return _UNSAFE.sub(_escape, text)


def escape_user_name(user: str) -> str:
    """``user`` as one blank-free, printable field of a reply: a valid name as
    it is, any other with every blank, backslash and unprintable character as
    its code point (``\\x20``, ``\\x5c``, ``\\u2028``, ``\\udcff``).

    Names come from the MTA too (SMTP AUTH), so a reply must never carry one
    raw. The ingest protocol has always spelt them so (no ``\\n``, no byte
    for a surrogate, unlike :func:`escape_text`): clients may parse it, so it
    stays.
    """
    if not user or is_valid_user_name(user):
        return user
    return "".join(
        character
        if character.isprintable() and not character.isspace() and character != "\\"
        else _code_point(ord(character))
        for character in user
    )
