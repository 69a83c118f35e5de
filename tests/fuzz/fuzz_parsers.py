"""Coverage-guided fuzz target (atheris/libFuzzer) for the untrusted-input parsers.

The first byte picks the parser, the rest is its input:

- the ingest request line parser (``popauth.doors.ingest.protocol.parse_request``);
- the socketmap netstring decoder and request parser (``popauth.doors.socketmap.codec``);
- the client address parser (``popauth.basics.addresses.parse_client_address``).

Each may refuse its input only with its own error type; anything else, or a
broken invariant, is a crash that libFuzzer reports with the input.

    python tests/fuzz/fuzz_parsers.py -max_total_time=30 [CORPUS_DIR]
"""

from __future__ import annotations

import ipaddress
import sys

import atheris

with atheris.instrument_imports():
    from popauth.basics.addresses import AddressError, parse_client_address
    from popauth.basics.usernames import is_valid_user_name
    from popauth.doors.ingest.protocol import ProtocolError, parse_request
    from popauth.doors.socketmap import codec

BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def check_ingest_line(data: bytes) -> None:
    try:
        request = parse_request(data)
    except ProtocolError:
        return
    if request.user and not is_valid_user_name(request.user):
        raise AssertionError(f"invalid user name accepted: {request.user!r}")
    if request.address is not None:
        check_usable(request.address)


def check_netstring(data: bytes) -> None:
    try:
        decoded = codec.decode(data)
    except codec.NetstringError:
        return
    if decoded is None:
        return
    payload, rest = decoded
    if codec.encode(payload) + rest != data:
        raise AssertionError("decode lost or invented bytes")
    try:
        request = codec.parse_request(payload)
    except codec.RequestError:
        return
    if f"{request.name} {request.key}".encode("ascii") != payload:
        raise AssertionError("request does not round trip")


def check_address(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    try:
        address = parse_client_address(text)
    except AddressError:
        return
    check_usable(address)
    if parse_client_address(str(address)) != address:
        raise AssertionError(f"{text!r} does not round trip")


def check_usable(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    if address.is_unspecified or address.is_multicast or address == BROADCAST:
        raise AssertionError(f"unusable address accepted: {address}")


TARGETS = (check_ingest_line, check_netstring, check_address)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    TARGETS[data[0] % len(TARGETS)](data[1:])


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
