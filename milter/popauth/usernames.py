"""What a user name may look like wherever popauth keeps or sends one.

The ingest protocol is line- and blank-separated, and the state files feed
the same replies (``LIST``, ``BLOCKED``, ``REPORT``): a name with a blank or
a control character would break their framing, so such a name is refused on
the wire and dropped (and logged) when a state file holds one.
"""

from __future__ import annotations

import re

MAX_USER = 256

_BLANK = re.compile(r"\s").search


def is_valid_user_name(user: object) -> bool:
    """1 to MAX_USER printable characters, none of them blank."""
    return (
        isinstance(user, str)
        and 0 < len(user) <= MAX_USER
        and user.isprintable()
        and not _BLANK(user)
    )


def printable_user_name(user: str) -> str:
    """``user`` as one blank-free, printable field: anything else is escaped.

    Names come from the MTA too (SMTP AUTH), so a reply or a log line must
    never carry one raw.
    """
    if not user or is_valid_user_name(user):
        return user
    return "".join(_escaped(character) for character in user)


def _escaped(character: str) -> str:
    if character.isprintable() and not character.isspace() and character != "\\":
        return character
    code = ord(character)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
