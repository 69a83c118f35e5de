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
    TEMPFAIL_BUDGET_SPENT,
    TEMPFAIL_UNAVAILABLE,
    Budget,
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


@pytest.mark.parametrize(
    ("budget", "recipient", "expected"),
    [
        (Budget.NOT_COUNTED, REMOTE, ACCEPT_WHITELISTED),
        (Budget.LEFT, REMOTE, ACCEPT_WHITELISTED),
        (Budget.SPENT, REMOTE, TEMPFAIL_BUDGET_SPENT),
        (Budget.UNAVAILABLE, REMOTE, TEMPFAIL_UNAVAILABLE),
        # Local recipients are never the budget's to refuse.
        (Budget.SPENT, LOCAL, ACCEPT_LOCAL),
        (Budget.UNAVAILABLE, LOCAL, ACCEPT_LOCAL),
    ],
)
def test_the_relay_budget_of_a_pop_first_client(
    budget: Budget, recipient: Recipient, expected: Decision
) -> None:
    client = Client(STRANGER, listing=Listing.LISTED, budget=budget)
    assert decide_recipient(POLICY, client, recipient) == expected
    # Settled for the message only while the budget lets the grant stand.
    settled = decide_sender(POLICY, client)
    assert settled == (ACCEPT_WHITELISTED if budget in (Budget.NOT_COUNTED, Budget.LEFT) else None)


def test_a_spent_budget_is_no_concern_of_smtp_auth_or_trusted_clients() -> None:
    assert decide_recipient(POLICY, Client(STRANGER, "alice", budget=Budget.SPENT), REMOTE) == (
        ACCEPT_AUTHENTICATED
    )
    assert decide_recipient(POLICY, Client(TRUSTED, budget=Budget.SPENT), REMOTE) == ACCEPT_TRUSTED


def test_a_retired_pop_first_is_refused_as_retired_whatever_the_budget() -> None:
    policy = RelayPolicy(POLICY.trusted_networks, POLICY.local_delivery, PopFirst.OFF)
    client = Client(STRANGER, listing=Listing.LISTED, budget=Budget.SPENT)
    assert decide_recipient(policy, client, REMOTE) == REJECT_POP_FIRST_RETIRED
