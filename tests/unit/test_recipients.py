"""Which recipients count as delivered here: every witness must agree."""

from __future__ import annotations

import pytest

from popauth.relay.postfixlists import ListKind, ListPattern, PostfixList, TransportRoutes
from popauth.relay.recipients import (
    DeliveryClass,
    DomainSet,
    LocalDeliveryRules,
    Recipient,
    is_local_recipient,
    plain_address_parts,
)

DOMAINS = DomainSet.of(["local.test", ".hosted.test"])
RULES = LocalDeliveryRules.configured(["local.test", ".hosted.test"], ["local", "virtual"])


@pytest.mark.parametrize(
    ("address", "parts"),
    [
        ("<user@local.test>", ("user", "local.test")),
        ("user@local.test", ("user", "local.test")),
        ("<postmaster>", ("postmaster", None)),
        ("<user%remote.example@local.test>", None),
        ("<remote.example!user@local.test>", None),
        ('<"user@remote.example"@local.test>', None),
        ("<user@remote.example@local.test>", None),
        ("<@local.test:user@remote.example>", None),
        ("<user\\@remote.example@local.test>", None),
        ("<>", None),
        ("<user@>", None),
        ("<@local.test>", None),
    ],
)
def test_plain_address_parts(address: str, parts: tuple[str, str | None] | None) -> None:
    assert plain_address_parts(address) == parts


@pytest.mark.parametrize(
    "recipient",
    [
        Recipient("<user@local.test>", "local", "user@local.test"),
        Recipient("<user@LOCAL.TEST>", "local", "user@local.test"),
        Recipient("<user@local.test.>", "local", "user@local.test"),
        Recipient("<user@a.hosted.test>", "virtual", "user@a.hosted.test"),
        Recipient("<postmaster>", "local", "postmaster@local.test"),
        # Sendmail hands the local mailer a bare user name.
        Recipient("<user@local.test>", "local", "user"),
        Recipient("<user@local.test>", "LOCAL", None),
    ],
)
def test_local(recipient: Recipient) -> None:
    assert is_local_recipient(recipient, RULES)


@pytest.mark.parametrize(
    "recipient",
    [
        Recipient("<user@remote.example>", "smtp", "user@remote.example"),
        # The MTA relays it, whatever the text says.
        Recipient("<user@local.test>", "smtp", "user@local.test"),
        # Missing macro: cannot be judged, so not local.
        Recipient("<user@local.test>", None, None),
        # Routing tricks: refused even if the MTA called it local.
        Recipient("<user%remote.example@local.test>", "local", "user%remote.example"),
        Recipient("<remote.example!user@local.test>", "local", "remote.example!user"),
        Recipient('<"user@remote.example"@local.test>', "local", None),
        Recipient("<@local.test:user@remote.example>", "local", None),
        # The resolved address left the local domains.
        Recipient("<user@local.test>", "local", "user@remote.example"),
        # Subdomains are local only when listed with a leading dot.
        Recipient("<user@sub.local.test>", "local", "user@sub.local.test"),
        Recipient("<user@hosted.test>", "virtual", "user@hosted.test"),
        Recipient("<user@[127.0.0.1]>", "local", "user@[127.0.0.1]"),
        Recipient("<>", "local", ""),
        # Postfix strips one root dot, not two.
        Recipient("<user@local.test..>", "local", None),
    ],
)
def test_not_local(recipient: Recipient) -> None:
    assert not is_local_recipient(recipient, RULES)


def test_domain_set() -> None:
    assert "LOCAL.test." in DOMAINS
    assert "x.y.hosted.test" in DOMAINS
    assert "hosted.test" not in DOMAINS
    assert "evil-local.test" not in DOMAINS
    assert not DomainSet.of([])


def postfix_list(
    *patterns: str, kind: ListKind = ListKind.STRING, parent: bool = False
) -> PostfixList:
    """Name patterns as written in main.cf ("!" excludes)."""
    parsed = [ListPattern(not p.startswith("!"), p.lstrip("!")) for p in patterns]
    return PostfixList(tuple(parsed), kind, parent)


# The layout of an open relay found by an attack: a backup MX that excludes
# one customer's subdomain, and one address routed by transport_maps to an
# inner host over smtp (the default transport's word too).
ROUTES = TransportRoutes({"legacy@example.test": "smtp"})
BACKUP_MX = LocalDeliveryRules(
    (
        DeliveryClass(
            "local", postfix_list("mx.example.test", "example.test"), frozenset({"local"}), ROUTES
        ),
        DeliveryClass(
            "relay",
            postfix_list("!customer.backup.test", "backup.test", kind=ListKind.DOMAIN, parent=True),
            frozenset({"relay"}),
            ROUTES,
        ),
    )
)


@pytest.mark.parametrize(
    ("address", "mailer", "local"),
    [
        # The exclusion holds, whatever the mailer.
        ("anyone@customer.backup.test", "smtp", False),
        ("anyone@customer.backup.test", "relay", False),
        ("anyone@deeper.customer.backup.test", "relay", False),
        ("anyone@backup.test", "relay", True),
        ("anyone@other.backup.test", "relay", True),
        # A mailer of another class does not count.
        ("anyone@backup.test", "local", False),
        ("anyone@example.test", "relay", False),
        # smtp is local for the routed address only.
        ("legacy@example.test", "smtp", True),
        ("legacy@example.test", "local", False),
        ("other@example.test", "smtp", False),
        ("other@example.test", "local", True),
        ("anyone@backup.test", "smtp", False),
        ("anyone@remote.example", "smtp", False),
        # mydestination is a list of exact names.
        ("anyone@sub.example.test", "local", False),
    ],
)
def test_domain_and_mailer_come_from_one_class(address: str, mailer: str, local: bool) -> None:
    recipient = Recipient(f"<{address}>", mailer, address)
    assert is_local_recipient(recipient, BACKUP_MX) is local


def test_the_class_is_chosen_by_the_resolved_domain_and_the_envelope_must_agree() -> None:
    # Postfix routes by {rcpt_addr}; an envelope in another class is refused.
    assert not is_local_recipient(
        Recipient("<x@backup.test>", "local", "x@example.test"), BACKUP_MX
    )
    assert is_local_recipient(Recipient("<Legacy@Example.TEST.>", "SMTP", None), BACKUP_MX)
    # Without a class for bare local parts, a bare user is not local.
    assert not is_local_recipient(Recipient("<postmaster>", "local", None), BACKUP_MX)
    assert is_local_recipient(
        Recipient("<postmaster>", "local", "postmaster@example.test"), BACKUP_MX
    )
