"""The one escaper keeps the ingest protocol's spelling of user names, byte for byte."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from popauth.basics.escaping import escape_text, escape_user_name
from popauth.basics.usernames import is_valid_user_name


def _as_replies_spelt_them(user: str) -> str:
    """The user fields of LIST, QUERY, BLOCKED, REPORT and EXPLAIN as they have always been."""
    if not user or is_valid_user_name(user):
        return user
    spelt = []
    for character in user:
        code = ord(character)
        if character.isprintable() and not character.isspace() and character != "\\":
            spelt.append(character)
        elif code < 0x100:
            spelt.append(f"\\x{code:02x}")
        elif code < 0x10000:
            spelt.append(f"\\u{code:04x}")
        else:
            spelt.append(f"\\U{code:08x}")
    return "".join(spelt)


NAMES = st.text(
    st.one_of(
        st.sampled_from(" \\\t\n\r\x00\x1b\x7f\x85\xa0\u2028\u202e\udcff\ud800\U0001f600aé"),
        st.characters(),
    ),
    max_size=40,
)


@given(NAMES)
def test_user_names_are_spelt_as_replies_always_spelt_them(user: str) -> None:
    assert escape_user_name(user) == _as_replies_spelt_them(user)


@given(NAMES)
def test_an_escaped_user_name_is_one_printable_word(user: str) -> None:
    word = escape_user_name(user)
    assert word.isprintable()
    assert not any(c.isspace() for c in word)


def test_the_two_spellings() -> None:
    assert escape_user_name("a b\\c") == "a\\x20b\\x5cc"
    assert escape_user_name("a\\b") == "a\\b"  # a valid name, as it is
    assert escape_user_name("x\udcff\n") == "x\\udcff\\x0a"
    assert escape_text("a b\\c\udcff\n") == "a b\\\\c\\xff\\n"
