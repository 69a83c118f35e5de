"""What a user name may look like wherever popauth keeps or sends one.

The ingest protocol is line- and blank-separated, and the state files feed
the same replies (``LIST``, ``BLOCKED``, ``REPORT``): a name with a blank or
a control character would break their framing, so such a name is refused on
the wire and dropped (and logged) when a state file holds one.

The block list matches names caselessly and without accents
(:func:`user_key`): the POP/IMAP server may accept ``Alice``, ``alice`` and
``Älice`` as one account (an SQL passdb with a case- or accent-insensitive
collation; PAM or passwd-file behind ``auth_username_format = %Lu``), so a
block of one spelling must refuse every other. A name whose caseless form
would not itself be a valid name could not be blocked, and is refused too.
"""

from __future__ import annotations

import re
import unicodedata

MAX_USER = 256

_BLANK = re.compile(r"\s").search


def _is_plain_name(user: str) -> bool:
    return 0 < len(user) <= MAX_USER and user.isprintable() and not _BLANK(user)


def user_key(user: str) -> str:
    """The caseless form of ``user``, by which the block list matches names.

    Unicode's compatibility caseless match (D145) without accents:
    ``Alice``, ``ALICE``, fullwidth ``alice`` and ``Älice`` are one name,
    ``Straße`` is ``strasse``. As broad as an accent- and case-insensitive
    SQL collation (MySQL's default ``utf8mb4_0900_ai_ci``), so that a block
    errs on the side of refusing. The key never holds a blank: a character
    whose compatibility form holds one (``¨`` is a space and a combining
    diaeresis) keeps its own form. A name of accents only keeps them.
    """
    if user.isascii():
        return user.lower()  # the common case, and the same result
    folded = _compatible(unicodedata.normalize("NFD", user).casefold())
    folded = _compatible(folded.casefold())
    bare = "".join(c for c in folded if not unicodedata.combining(c)) or folded
    return unicodedata.normalize("NFC", bare)


def _compatible(text: str) -> str:
    """NFKD, except for characters whose compatibility form holds a blank."""
    return "".join(
        decomposed if not _BLANK(decomposed := unicodedata.normalize("NFKD", c)) else c
        for c in text
    )


def is_valid_user_name(user: object) -> bool:
    """1 to MAX_USER printable characters, none of them blank, in both
    the name and its caseless form."""
    if not isinstance(user, str):
        return False
    if user.isascii():
        # The common case, answered without a regular expression: the only
        # printable ASCII blank is the space, and the caseless form (the
        # lower case) is exactly as plain as the name.
        return 0 < len(user) <= MAX_USER and user.isprintable() and " " not in user
    return _is_plain_name(user) and _is_plain_name(user_key(user))
