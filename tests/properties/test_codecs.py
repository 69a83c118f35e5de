"""Properties of the wire codecs: no bytes crash them, and format/parse round trip."""

from __future__ import annotations

import contextlib
import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from popauth.basics.addresses import unmap
from popauth.basics.usernames import MAX_USER, is_valid_user_name, user_key
from popauth.doors.ingest.protocol import (
    MAX_LINE,
    ErrorCode,
    ProtocolError,
    Request,
    Verb,
    parse_fields,
    parse_request,
)
from popauth.doors.socketmap import codec
from tests.properties.strategies import client_addresses, user_names


@given(st.binary(max_size=MAX_LINE + 64))
def test_no_bytes_crash_the_ingest_parser(line: bytes) -> None:
    try:
        request = parse_request(line)
    except ProtocolError as problem:
        assert isinstance(problem.code, ErrorCode)
        return
    assert isinstance(request, Request)
    assert request.user == "" or is_valid_user_name(request.user)


@given(st.lists(st.sampled_from([v.value for v in Verb]) | st.text(max_size=20), max_size=4))
def test_no_word_sequence_crashes_the_ingest_parser(words: list[str]) -> None:
    with contextlib.suppress(ProtocolError):
        parse_request(" ".join(words).encode("utf-8", "surrogatepass"))


@given(client_addresses(), user_names(), st.sampled_from(["\n", "\r\n", ""]))
def test_login_lines_round_trip(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, user: str, ending: str
) -> None:
    request = parse_request(f"LOGIN {address} {user}{ending}".encode())
    assert request == Request(Verb.LOGIN, unmap(address), user)


@given(client_addresses(), user_names())
def test_renew_and_query_lines_round_trip(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, user: str
) -> None:
    assert parse_request(f"RENEW {address} {user}".encode()) == Request(
        Verb.RENEW, unmap(address), user
    )
    assert parse_request(f"query {address}".encode()) == Request(Verb.QUERY, unmap(address))


@given(user_names())
def test_user_verbs_round_trip(user: str) -> None:
    for verb in (Verb.BLOCK, Verb.UNBLOCK, Verb.REVOKEUSER):
        assert parse_request(f"{verb.value} {user}\n".encode()) == Request(verb, None, user)


@given(st.text(max_size=MAX_USER + 10))
def test_a_user_name_is_accepted_only_if_valid(user: str) -> None:
    try:
        request = parse_request(f"BLOCK {user}".encode("utf-8", "surrogatepass"))
    except ProtocolError:
        return
    # split() took the first word: the name parsed is a valid one.
    assert is_valid_user_name(request.user)


@given(st.dictionaries(st.from_regex(r"[a-z_]{1,12}", fullmatch=True), user_names(), max_size=6))
def test_reply_fields_round_trip(fields: dict[str, str]) -> None:
    line = " ".join(f"{key}={value}" for key, value in fields.items())
    assert parse_fields(line) == fields


@given(st.binary(max_size=codec.MAX_REQUEST))
def test_netstrings_round_trip(payload: bytes) -> None:
    assert codec.decode(codec.encode(payload)) == (payload, b"")
    assert codec.decode(codec.encode(payload) + b"5:tail,") == (payload, b"5:tail,")


@given(st.binary(max_size=codec.MAX_REQUEST))
def test_a_cut_netstring_asks_for_more(payload: bytes) -> None:
    framed = codec.encode(payload)
    for cut in range(len(framed)):
        assert codec.decode(framed[:cut]) is None


@given(st.binary(max_size=2 * codec.MAX_REQUEST))
def test_no_bytes_crash_the_netstring_decoder(buffer: bytes) -> None:
    try:
        result = codec.decode(buffer)
    except codec.NetstringError:
        return
    if result is not None:
        payload, rest = result
        assert len(payload) <= codec.MAX_REQUEST
        assert codec.encode(payload) + rest == buffer


@given(st.binary(max_size=codec.MAX_REQUEST))
def test_no_payload_crashes_the_request_parser(payload: bytes) -> None:
    try:
        request = codec.parse_request(payload)
    except codec.RequestError:
        return
    assert f"{request.name} {request.key}".encode("ascii") == payload


@given(st.sampled_from(list(codec.Status)), st.text(max_size=200))
def test_replies_are_one_ascii_netstring(status: codec.Status, text: str) -> None:
    framed = codec.reply(status, text)
    result = codec.decode(framed, max_length=10_000)
    assert result is not None
    payload, rest = result
    assert rest == b""
    assert payload.startswith(status.value.encode() + b" ")
    assert payload.decode("ascii").isprintable()


@given(user_names())
def test_the_block_list_key_is_a_valid_name_and_its_own_key(user: str) -> None:
    key = user_key(user)
    assert is_valid_user_name(key)
    assert user_key(key) == key
    if user.isascii():
        assert user_key(user.upper()) == user_key(user.lower()) == user.lower()
