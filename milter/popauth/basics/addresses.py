"""Client addresses as the MTAs hand them over, normalised one way everywhere.

Every door (milter, ingest socket, CLI) turns a textual address into the same
value, so a login reported as ``::ffff:192.0.2.1`` whitelists the client that
Postfix later reports as ``192.0.2.1`` and Sendmail as ``IPv6:::ffff:192.0.2.1``.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from popauth.basics.errors import InputError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Longest textual address we bother to parse: a full IPv6 address with an
# ``IPv6:`` tag, brackets and a zone index fits well within this.
_MAX_ADDRESS_TEXT = 100


# An interface name or number, as in fe80::1%eth0.
_ZONE = re.compile(r"[A-Za-z0-9_.-]{1,32}")
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
_UNSPECIFIED_V4 = bytes(4)
_BROADCAST_V4 = _BROADCAST.packed


class AddressError(InputError):
    """The text is not a usable client IP address."""


def parse_client_address(text: str) -> IPAddress:
    """Parse an address from an MTA macro, a POP server hook or a person.

    Accepts exactly the forms the MTAs and POP servers use: ``192.0.2.1``,
    ``2001:db8::1``, ``IPv6:2001:db8::1`` (Sendmail and Postfix
    ``{client_addr}`` form) and zone-qualified IPv6 (``fe80::1%eth0``).
    IPv4-mapped IPv6 becomes the IPv4 address.

    Refused, in every door: anything else around the address (blanks,
    brackets, an ``IPv6:`` tag on IPv4, a zone on IPv4), and addresses no
    client can have: unspecified (``0.0.0.0``, ``::``), broadcast
    (``255.255.255.255``) and multicast.
    """
    if len(text) > _MAX_ADDRESS_TEXT:
        raise AddressError("address too long")
    # Fast path for the common case, a plain IPv4 address: inet_pton
    # validates in C, the first and last bytes tell unspecified, broadcast
    # and multicast (224.0.0.0/4) apart, and the packed form builds the
    # address object without re-parsing.
    try:
        packed = socket.inet_pton(socket.AF_INET, text)
    except (OSError, ValueError):
        return _usable(_parse_ipv6(text), text)
    if packed in (_UNSPECIFIED_V4, _BROADCAST_V4) or 224 <= packed[0] <= 239:
        raise AddressError(f"not a client address: {text!r} (unspecified, broadcast or multicast)")
    return ipaddress.IPv4Address(packed)


def _parse_ipv6(text: str) -> IPAddress:
    candidate = text[5:] if text[:5].lower() == "ipv6:" else text
    # The zone index names an interface on the MTA host; the same client must
    # match whichever interface it came in on.
    candidate, percent, zone = candidate.partition("%")
    if percent and not _ZONE.fullmatch(zone):
        raise AddressError(f"not an IP address: {text!r}")
    try:
        return unmap(ipaddress.IPv6Address(socket.inet_pton(socket.AF_INET6, candidate)))
    except (OSError, ValueError):
        pass
    if ":" not in candidate and "." in candidate:
        # inet_pton refused it as IPv6: IPv4 with an IPv6: tag or a zone.
        raise AddressError(f"not an IP address: {text!r} (IPv4 takes no brackets, tag or zone)")
    raise AddressError(f"not an IP address: {text!r}")


def _usable(address: IPAddress, text: str) -> IPAddress:
    if address.is_unspecified or address.is_multicast or address == _BROADCAST:
        raise AddressError(f"not a client address: {text!r} (unspecified, broadcast or multicast)")
    if isinstance(address, ipaddress.IPv4Address) and "%" in text:
        raise AddressError(f"not an IP address: {text!r} (IPv4 takes no zone)")
    return address


def address_text(address: IPAddress) -> str:
    """``str(address)``, for IPv4 from its packed form in C (several times
    cheaper: it is written in every decision's log line)."""
    if isinstance(address, ipaddress.IPv4Address):
        return socket.inet_ntoa(address.packed)
    return str(address)


def parse_stored_key(text: str) -> IPAddress:
    """A whitelist key as popauth itself wrote it (snapshot, Redis): the
    canonical text of an address or of an IPv6 prefix's network address,
    which may be ``::`` with a short ``ipv6_prefix``."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise AddressError(f"not a stored address: {text!r}") from None
    if str(address) != text or address.is_multicast:
        raise AddressError(f"not a stored address: {text!r}")
    return unmap(address)


def unmap(address: IPAddress) -> IPAddress:
    """Return the IPv4 address behind an IPv4-mapped IPv6 address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_network(text: str) -> IPNetwork:
    """Parse a network such as ``192.0.2.0/24``; mapped IPv6 becomes IPv4."""
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as error:
        raise AddressError(f"not a network: {text!r} ({error})") from None
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


@dataclass(frozen=True, slots=True)
class WhitelistKeying:
    """How a client address maps onto a whitelist key.

    IPv6 clients with privacy extensions may change their address between the
    POP login and the SMTP session, so an operator can whitelist the whole
    prefix the login came from. IPv4 is always the single address.
    """

    ipv6_prefix: int = 128

    def key_address(self, address: IPAddress) -> IPAddress:
        if isinstance(address, ipaddress.IPv6Address) and self.ipv6_prefix < 128:
            network = ipaddress.IPv6Network((address, self.ipv6_prefix), strict=False)
            return network.network_address
        return address

    def describe(self, key: IPAddress) -> str:
        """Text for logs and listings: the address, or the IPv6 prefix it stands for."""
        if isinstance(key, ipaddress.IPv6Address) and self.ipv6_prefix < 128:
            return f"{key}/{self.ipv6_prefix}"
        return address_text(key)


@dataclass(frozen=True, slots=True)
class NetworkSet:
    """A set of networks with a membership test, split by family for speed."""

    v4: tuple[ipaddress.IPv4Network, ...] = ()
    v6: tuple[ipaddress.IPv6Network, ...] = ()

    @classmethod
    def of(cls, networks: Iterable[IPNetwork]) -> NetworkSet:
        v4: list[ipaddress.IPv4Network] = []
        v6: list[ipaddress.IPv6Network] = []
        for network in networks:
            if isinstance(network, ipaddress.IPv4Network):
                v4.append(network)
            else:
                v6.append(network)
        return cls(tuple(v4), tuple(v6))

    def __contains__(self, address: object) -> bool:
        # Integer masks: this runs for every connection and message.
        if isinstance(address, ipaddress.IPv4Address):
            networks: tuple[IPNetwork, ...] = self.v4
        elif isinstance(address, ipaddress.IPv6Address):
            networks = self.v6
        else:
            return False
        if not networks:
            return False
        value = int(address)
        for network in networks:
            if value & int(network.netmask) == int(network.network_address):
                return True
        return False

    def __iter__(self) -> Iterator[IPNetwork]:
        yield from self.v4
        yield from self.v6

    def __bool__(self) -> bool:
        return bool(self.v4 or self.v6)
