"""Hypothesis strategies shared by the property tests."""

from __future__ import annotations

import ipaddress

from hypothesis import strategies as st

from popauth.basics.usernames import MAX_USER, user_key


def _usable(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    address = (
        address.ipv4_mapped
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped
        else address
    )
    return not (
        address.is_unspecified
        or address.is_multicast
        or address == ipaddress.IPv4Address("255.255.255.255")
    )


def client_addresses() -> st.SearchStrategy[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Addresses a client can have (no unspecified, broadcast or multicast)."""
    return (st.ip_addresses(v=4) | st.ip_addresses(v=6)).filter(_usable)


def user_names() -> st.SearchStrategy[str]:
    """Valid user names: printable, no blanks, 1 to MAX_USER characters, and
    so is their caseless form (the block list's key)."""
    return st.text(
        st.characters(blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp", "Cf", "Co", "Cn")),
        min_size=1,
        max_size=min(MAX_USER, 40),
    ).filter(lambda name: _plain(name) and _plain(user_key(name)))


def _plain(name: str) -> bool:
    return 0 < len(name) <= MAX_USER and name.isprintable() and not any(c.isspace() for c in name)
