from __future__ import annotations

import ipaddress

import pytest

from popauth.addresses import (
    AddressError,
    NetworkSet,
    WhitelistKeying,
    parse_client_address,
    parse_network,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.1", "192.0.2.1"),
        (" 192.0.2.1 ", "192.0.2.1"),
        ("[192.0.2.1]", "192.0.2.1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("IPv6:::ffff:192.0.2.1", "192.0.2.1"),
        ("ipv6:2001:db8::1", "2001:db8::1"),
        ("[IPv6:2001:DB8::1]", "2001:db8::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("::1", "::1"),
    ],
)
def test_parse_client_address(text: str, expected: str) -> None:
    assert parse_client_address(text) == ipaddress.ip_address(expected)


@pytest.mark.parametrize(
    "text", ["", "garbage", "300.1.1.1", "192.0.2", "unknown", "1" * 200, "IPv6:", "192.0.2.1/32"]
)
def test_parse_client_address_rejects(text: str) -> None:
    with pytest.raises(AddressError):
        parse_client_address(text)


def test_ipv6_prefix_keying() -> None:
    keying = WhitelistKeying(64)
    a = parse_client_address("2001:db8:1:2:aaaa::1")
    b = parse_client_address("2001:db8:1:2:bbbb::2")
    other = parse_client_address("2001:db8:1:3::1")
    assert keying.key_address(a) == keying.key_address(b)
    assert keying.key_address(a) != keying.key_address(other)
    assert keying.describe(keying.key_address(a)) == "2001:db8:1:2::/64"
    v4 = parse_client_address("192.0.2.1")
    assert keying.key_address(v4) == v4
    assert keying.describe(v4) == "192.0.2.1"


def test_default_keying_is_the_single_address() -> None:
    keying = WhitelistKeying()
    a = parse_client_address("2001:db8::1")
    assert keying.key_address(a) == a
    assert keying.describe(a) == "2001:db8::1"


def test_network_set() -> None:
    networks = NetworkSet.of([parse_network("10.0.0.0/8"), parse_network("::ffff:192.0.2.0/120")])
    assert parse_client_address("10.1.2.3") in networks
    assert parse_client_address("::ffff:192.0.2.7") in networks
    assert parse_client_address("192.0.2.7") in networks
    assert parse_client_address("11.0.0.1") not in networks
    assert parse_client_address("::1") not in networks
    assert None not in networks
    assert len(list(networks)) == 2


def test_parse_network_rejects_host_bits() -> None:
    with pytest.raises(AddressError):
        parse_network("10.0.0.1/8")
