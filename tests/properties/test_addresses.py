"""Properties of the address parser shared by every door."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from popauth.basics.addresses import (
    AddressError,
    WhitelistKeying,
    address_text,
    parse_client_address,
    parse_stored_key,
    unmap,
)
from tests.properties.strategies import client_addresses

BROADCAST = ipaddress.IPv4Address("255.255.255.255")
ADDRESS_ALPHABET = st.sampled_from("0123456789abcdefABCDEF:.%[]IPvV6 \n\x00/-")


def assert_usable(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    assert not address.is_unspecified
    assert not address.is_multicast
    assert address != BROADCAST
    # Mapped IPv6 is always handed back as IPv4.
    assert not (isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped)
    assert address.version == 4 or getattr(address, "scope_id", None) is None


@given(st.text(max_size=120) | st.text(ADDRESS_ALPHABET, max_size=60))
def test_any_text_is_refused_or_a_usable_address(text: str) -> None:
    try:
        address = parse_client_address(text)
    except AddressError:
        return
    assert_usable(address)
    assert text == text.strip()
    assert not text.startswith("[")
    if isinstance(address, ipaddress.IPv4Address):
        assert "%" not in text


@given(client_addresses())
def test_format_parse_round_trip(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    assert parse_client_address(str(address)) == unmap(address)
    assert parse_client_address(address.exploded) == unmap(address)


@given(st.ip_addresses(v=6))
def test_the_mta_forms_of_ipv6_name_the_same_client(address: ipaddress.IPv6Address) -> None:
    assume(address.ipv4_mapped is None)
    try:
        plain = parse_client_address(str(address))
    except AddressError:
        # Unspecified or multicast: refused in every form.
        for form in (f"IPv6:{address}", f"{address}%eth0"):
            with pytest.raises(AddressError):
                parse_client_address(form)
        return
    assert parse_client_address(f"IPv6:{address}") == plain
    assert parse_client_address(f"ipv6:{address.exploded}") == plain
    assert parse_client_address(f"{address}%eth0") == plain


@given(st.ip_addresses(v=4))
def test_ipv4_takes_no_tag_zone_or_brackets(address: ipaddress.IPv4Address) -> None:
    for form in (f"IPv6:{address}", f"{address}%eth0", f"[{address}]", f" {address}"):
        with pytest.raises(AddressError):
            parse_client_address(form)


@given(client_addresses(), st.integers(min_value=0, max_value=128))
def test_whitelist_keys_survive_a_store_round_trip(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, prefix: int
) -> None:
    key = WhitelistKeying(prefix).key_address(unmap(address))
    assert parse_stored_key(str(key)) == key


@given(st.ip_addresses())
def test_address_text_is_the_text_of_the_address(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    assert address_text(address) == str(address)
