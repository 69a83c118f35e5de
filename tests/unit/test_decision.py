"""The relay decision, as a table: every step, in order, and its edges."""

from __future__ import annotations

import ipaddress

import pytest

from popauth.basics.addresses import NetworkSet, parse_network
from popauth.relay.decision import (
    ACCEPT_AUTHENTICATED,
    ACCEPT_LOCAL,
    ACCEPT_TRUSTED,
    ACCEPT_WHITELISTED,
    REJECT_POP_FIRST_RETIRED,
    REJECT_RELAY,
    TEMPFAIL_UNAVAILABLE,
    Client,
    Decision,
    Listing,
    PopFirst,
    RelayPolicy,
    decide_connection,
    decide_recipient,
    decide_sender,
    needs_whitelist,
)
from popauth.relay.recipients import LocalDeliveryRules, Recipient

POLICY = RelayPolicy(
    trusted_networks=NetworkSet.of([parse_network("192.0.2.0/24"), parse_network("2001:db8::/64")]),
    local_delivery=LocalDeliveryRules.configured(["local.test"], ["local", "virtual"]),
)
STRANGER = ipaddress.ip_address("198.51.100.7")
TRUSTED = ipaddress.ip_address("192.0.2.10")
LOCAL = Recipient("<user@local.test>", "local", "user@local.test")
REMOTE = Recipient("<user@remote.example>", "smtp", "user@remote.example")
PERCENT_HACK = Recipient("<user%remote.example@local.test>", "smtp", "user@remote.example")


@pytest.mark.parametrize(
    ("client", "recipient", "expected"),
    [
        # 1. SMTP AUTH wins over everything, even with the store down.
        (Client(STRANGER, "alice"), REMOTE, ACCEPT_AUTHENTICATED),
        (Client(STRANGER, "alice", Listing.UNAVAILABLE), REMOTE, ACCEPT_AUTHENTICATED),
        (Client(None, "alice"), REMOTE, ACCEPT_AUTHENTICATED),
        # 2. Trusted networks.
        (Client(TRUSTED), REMOTE, ACCEPT_TRUSTED),
        (Client(ipaddress.ip_address("2001:db8::99")), REMOTE, ACCEPT_TRUSTED),
        # 3. The whitelist.
        (Client(STRANGER, listing=Listing.LISTED), REMOTE, ACCEPT_WHITELISTED),
        (Client(STRANGER, listing=Listing.LISTED), PERCENT_HACK, ACCEPT_WHITELISTED),
        # A connection without an IP address is never whitelisted.
        (Client(None, listing=Listing.LISTED), REMOTE, REJECT_RELAY),
        # 4. Local recipients from anyone.
        (Client(STRANGER), LOCAL, ACCEPT_LOCAL),
        (Client(STRANGER, listing=Listing.NOT_LISTED), LOCAL, ACCEPT_LOCAL),
        (Client(STRANGER, listing=Listing.UNAVAILABLE), LOCAL, ACCEPT_LOCAL),
        (Client(None), LOCAL, ACCEPT_LOCAL),
        # 5. Everyone else is refused; tempfail only when the store failed.
        (Client(STRANGER), REMOTE, REJECT_RELAY),
        (Client(STRANGER, listing=Listing.NOT_LISTED), REMOTE, REJECT_RELAY),
        (Client(STRANGER, listing=Listing.NOT_CONSULTED), REMOTE, REJECT_RELAY),
        (Client(STRANGER), PERCENT_HACK, REJECT_RELAY),
        (Client(STRANGER, listing=Listing.UNAVAILABLE), REMOTE, TEMPFAIL_UNAVAILABLE),
        (Client(STRANGER, listing=Listing.UNAVAILABLE), PERCENT_HACK, TEMPFAIL_UNAVAILABLE),
        # The MTA's word is needed: without a mailer nothing counts as local.
        (Client(STRANGER), Recipient("<user@local.test>"), REJECT_RELAY),
    ],
)
def test_decide_recipient(client: Client, recipient: Recipient, expected: Decision) -> None:
    assert decide_recipient(POLICY, client, recipient) == expected


def test_sender_decision_settles_only_client_level_steps() -> None:
    assert decide_sender(POLICY, Client(STRANGER, "bob")) == ACCEPT_AUTHENTICATED
    assert decide_sender(POLICY, Client(TRUSTED)) == ACCEPT_TRUSTED
    assert decide_sender(POLICY, Client(STRANGER, listing=Listing.LISTED)) == ACCEPT_WHITELISTED
    assert decide_sender(POLICY, Client(STRANGER, listing=Listing.NOT_LISTED)) is None
    assert decide_sender(POLICY, Client(STRANGER, listing=Listing.UNAVAILABLE)) is None


def test_connection_decision_only_for_trusted_networks() -> None:
    assert decide_connection(POLICY, TRUSTED) == ACCEPT_TRUSTED
    assert decide_connection(POLICY, STRANGER) is None
    assert decide_connection(POLICY, None) is None


def test_store_is_consulted_only_when_it_can_change_the_outcome() -> None:
    assert needs_whitelist(POLICY, STRANGER, "")
    assert not needs_whitelist(POLICY, STRANGER, "alice")
    assert not needs_whitelist(POLICY, TRUSTED, "")
    assert not needs_whitelist(POLICY, None, "")


@pytest.mark.parametrize(
    ("mode", "client", "recipient", "expected"),
    [
        (PopFirst.OFF, Client(STRANGER, listing=Listing.LISTED), REMOTE, REJECT_POP_FIRST_RETIRED),
        (PopFirst.OFF, Client(STRANGER, listing=Listing.LISTED), LOCAL, ACCEPT_LOCAL),
        (PopFirst.OFF, Client(STRANGER, "alice", Listing.LISTED), REMOTE, ACCEPT_AUTHENTICATED),
        (PopFirst.OFF, Client(STRANGER, listing=Listing.NOT_LISTED), REMOTE, REJECT_RELAY),
        (PopFirst.OFF, Client(TRUSTED), REMOTE, ACCEPT_TRUSTED),
        (PopFirst.WARN, Client(STRANGER, listing=Listing.LISTED), REMOTE, ACCEPT_WHITELISTED),
    ],
)
def test_pop_first_modes(
    mode: PopFirst, client: Client, recipient: Recipient, expected: Decision
) -> None:
    policy = RelayPolicy(POLICY.trusted_networks, POLICY.local_delivery, mode)
    assert decide_recipient(policy, client, recipient) == expected
