"""Properties of the policy codec: no bytes crash it, framing survives any split,
and whatever it accepts was a well-formed request for a client."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from popauth.doors.policy import codec
from popauth.doors.policy.codec import RequestError, RequestTooLong

NAMES = sorted(codec.JUDGED_ATTRIBUTES | {"helo_name", "queue_id", "x_new_attribute"})
# Values Postfix may send: any bytes but the newline and other control characters.
VALUES = st.binary(max_size=40).map(lambda raw: bytes(b for b in raw if b >= 0x20 and b != 0x7F))


def frame(attributes: list[tuple[str, bytes]]) -> bytes:
    return b"".join(name.encode() + b"=" + value + b"\n" for name, value in attributes) + b"\n"


BASE = [
    ("request", b"smtpd_access_policy"),
    ("protocol_state", b"RCPT"),
    ("client_address", b"192.0.2.7"),
]
_attributes = st.lists(st.tuples(st.sampled_from(NAMES), VALUES), max_size=12)
# Random attributes, alone or shuffled in with the ones a request needs.
requests = _attributes | _attributes.flatmap(lambda more: st.permutations(BASE + more))


@given(st.binary(max_size=600))
def test_no_bytes_crash_the_parser(payload: bytes) -> None:
    try:
        request = codec.parse_request(payload)
    except RequestError:
        return
    assert request.client_address
    assert request.protocol_state


@given(st.binary(max_size=600))
def test_no_bytes_crash_the_framing(buffer: bytes) -> None:
    try:
        split = codec.split_first(buffer, 200)
    except RequestTooLong:
        assert b"\n\n" not in buffer[:200]
        return
    if split is not None:
        payload, used = split
        assert 0 < used <= len(buffer)
        assert buffer[:used] == payload + b"\n" or (payload == b"" and used == 1)


@given(st.lists(requests, min_size=1, max_size=4), st.data())
def test_requests_are_framed_alike_however_the_bytes_arrive(
    stream: list[list[tuple[str, bytes]]], data: st.DataObject
) -> None:
    raw = b"".join(frame(attributes) for attributes in stream)
    whole: list[bytes] = []
    buffer = bytearray(raw)
    while (split := codec.split_first(buffer)) is not None:
        whole.append(split[0])
        del buffer[: split[1]]
    pieces: list[bytes] = []
    buffer = bytearray()
    position = 0
    while position < len(raw):
        step = data.draw(st.integers(1, 64))
        buffer += raw[position : position + step]
        position += step
        while (split := codec.split_first(buffer)) is not None:
            pieces.append(split[0])
            del buffer[: split[1]]
    assert pieces == whole
    assert not buffer


@given(requests)
def test_an_accepted_request_has_one_value_per_name_as_sent(
    attributes: list[tuple[str, bytes]],
) -> None:
    try:
        request = codec.parse_request(frame(attributes)[:-1])
    except RequestError:
        names = [name for name, _ in attributes if name in codec.JUDGED_ATTRIBUTES]
        given_once = dict(attributes)
        assert (
            len(set(names)) < len(names)
            or given_once.get("request") != b"smtpd_access_policy"
            or not given_once.get("client_address")
            or not given_once.get("protocol_state")
            or not attributes
        )
        return
    judged = [(name, value) for name, value in attributes if name in codec.JUDGED_ATTRIBUTES]
    sent = dict(judged)
    assert len(sent) == len(judged)
    assert request.client_address.encode("utf-8", "surrogateescape") == sent["client_address"]
    assert request.sender == (
        None if "sender" not in sent else sent["sender"].decode("utf-8", "surrogateescape")
    )


@given(st.text(max_size=80))
def test_a_reply_is_always_one_action_and_the_empty_line(text: str) -> None:
    reply = codec.reply(text)
    assert reply.startswith(b"action=")
    assert reply.endswith(b"\n\n")
    assert reply.count(b"\n") == 2
