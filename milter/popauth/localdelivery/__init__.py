"""Which domains and mailers the MTA delivers here, learned from the MTA itself.

A recipient counts as inbound (deliverable by anyone) only when its domain is
one of the local domains and the MTA's ``{rcpt_mailer}`` is one of the local
mailers. Both lists must match what the MTA really does, so popauth reads them
from the MTA's own configuration (``postfix``, ``sendmail``) unless the
settings name them; ``resolve`` joins the two and says where each came from.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from popauth.recipients import DomainSet

DOMAIN_PATTERN = re.compile(r"^\.?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*)\.?$")
MAILER_PATTERN = re.compile(r"^[A-Za-z0-9_.+-]{1,64}$")


class LearnError(Exception):
    """The MTA's configuration was found but could not be read whole."""


class MtaNotFound(LearnError):
    """There is no configuration of that MTA here (so "auto" tries the next)."""


def is_domain_name(text: str) -> bool:
    return bool(DOMAIN_PATTERN.match(text))


def is_mailer_name(text: str) -> bool:
    return bool(MAILER_PATTERN.match(text))


def canonical_domain(text: str) -> str:
    """Lower case, no root dot; a leading dot (every subdomain) is kept."""
    text = text.strip().lower()
    return text[:-1] if text.endswith(".") and len(text) > 1 else text


@dataclass
class Learned:
    """What one MTA's configuration says: each name with where it came from.

    The first origin recorded for a name is kept; later ones add nothing.
    """

    mta: str
    domains: dict[str, str] = field(default_factory=dict)
    mailers: dict[str, str] = field(default_factory=dict)

    def add_domain(self, domain: str, origin: str) -> None:
        self.domains.setdefault(canonical_domain(domain), origin)

    def add_mailer(self, mailer: str, origin: str) -> None:
        self.mailers.setdefault(mailer.lower(), origin)


@dataclass(frozen=True)
class LocalDelivery:
    """The effective local domains and mailers, each with its origin."""

    domains: tuple[tuple[str, str], ...]
    mailers: tuple[tuple[str, str], ...]
    # Which MTA was asked, e.g. "postfix (postconf -c /etc/postfix)"; "" if none.
    source: str = ""

    @classmethod
    def configured(cls, domains: Iterable[str], mailers: Iterable[str]) -> LocalDelivery:
        return cls(
            tuple((canonical_domain(d), "configured: local_domains") for d in domains),
            tuple((m.lower(), "configured: local_mailers") for m in mailers),
        )

    def domain_set(self) -> DomainSet:
        return DomainSet.of(domain for domain, _ in self.domains)

    def mailer_set(self) -> frozenset[str]:
        return frozenset(mailer for mailer, _ in self.mailers)

    def describe(self) -> list[str]:
        """Lines for ``popauth check-config``: every name and its origin."""
        lines = [f"learned from: {self.source or 'nothing (both lists are configured)'}"]
        lines.append("local mailers:")
        lines += [f"  {mailer:<24} {origin}" for mailer, origin in self.mailers]
        lines.append("local domains:")
        lines += [f"  {domain:<24} {origin}" for domain, origin in self.domains]
        return lines
