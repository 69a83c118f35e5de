from __future__ import annotations

import ipaddress

import pytest

from popauth.basics.addresses import (
    AddressError,
    NetworkSet,
    WhitelistKeying,
    parse_client_address,
    parse_network,
    parse_stored_key,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("IPv6:::ffff:192.0.2.1", "192.0.2.1"),
        ("ipv6:2001:db8::1", "2001:db8::1"),
        ("IPv6:2001:DB8::1", "2001:db8::1"),
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


# Issue 11, defect 11: loose forms and addresses no client can have.
LOOSE_OR_UNUSABLE = [
    "192.0.2.1%eth0",
    "[192.0.2.1]",
    "IPv6:192.0.2.1",
    "ipv6:192.0.2.1%eth0",
    "::ffff:192.0.2.1%eth0",
    " 192.0.2.1",
    "192.0.2.1 ",
    "[IPv6:2001:db8::1]",
    "[::1]",
    "fe80::1%",
    "fe80::1%eth0 x",
    "0.0.0.0",
    "::",
    "IPv6:::",
    "::ffff:0.0.0.0",
    "255.255.255.255",
    "::ffff:255.255.255.255",
    "224.0.0.1",
    "239.255.255.250",
    "ff02::1",
    "IPv6:ff05::2",
]


@pytest.mark.parametrize("text", LOOSE_OR_UNUSABLE)
def test_loose_forms_and_unusable_addresses_are_refused(text: str) -> None:
    with pytest.raises(AddressError):
        parse_client_address(text)


def test_stored_keys_are_canonical_text() -> None:
    assert parse_stored_key("2001:db8::") == ipaddress.ip_address("2001:db8::")
    assert parse_stored_key("::") == ipaddress.ip_address("::")
    for text in ("[192.0.2.1]", "192.0.2.1%eth0", "2001:DB8::", " 192.0.2.1", "ff02::1"):
        with pytest.raises(AddressError):
            parse_stored_key(text)
