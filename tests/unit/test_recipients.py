"""Which recipients count as delivered here: every witness must agree."""

from __future__ import annotations

import pytest

from popauth.recipients import DomainSet, Recipient, is_local_recipient, plain_address_parts

DOMAINS = DomainSet.of(["local.test", ".hosted.test"])
MAILERS = frozenset({"local", "virtual"})


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
    assert is_local_recipient(recipient, DOMAINS, MAILERS)


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
    ],
)
def test_not_local(recipient: Recipient) -> None:
    assert not is_local_recipient(recipient, DOMAINS, MAILERS)


def test_domain_set() -> None:
    assert "LOCAL.test." in DOMAINS
    assert "x.y.hosted.test" in DOMAINS
    assert "hosted.test" not in DOMAINS
    assert "evil-local.test" not in DOMAINS
    assert not DomainSet.of([])
