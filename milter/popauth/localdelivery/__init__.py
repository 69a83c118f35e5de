"""Which mail the MTA delivers here, learned from the MTA itself.

A recipient counts as inbound (deliverable by anyone) only when its domain
is in one of the MTA's delivery classes and the MTA's ``{rcpt_mailer}`` is
the mailer that class delivers it with (see :mod:`popauth.relay.recipients`).
That must match what the MTA really does, so popauth reads it from the
MTA's own configuration (``postfix``, ``sendmail``) unless the settings name
the domains and mailers; ``resolve`` joins the two and says where each
came from.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass

from popauth.basics.errors import UnavailableError
from popauth.relay.postfixlists import TransportRoutes
from popauth.relay.recipients import DeliveryClass, DomainSet, LocalDeliveryRules

# What a domain and a mailer name may look like, here and in the settings
# (matched whole).
DOMAIN_NAME = re.compile(r"\.?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*)\.?")
MAILER_NAME = re.compile(r"[A-Za-z0-9_.+-]{1,64}")
CONFIGURED_DOMAINS = "configured: local_domains"
CONFIGURED_MAILERS = "configured: local_mailers"
# How many transport_maps routes check-config shows by name per mailer.
SHOWN_ROUTE_KEYS = 3


class LearnFrom(enum.StrEnum):
    """Which MTA local delivery is learned from (``learn_from_mta``)."""

    AUTO = "auto"  # Postfix, then Sendmail
    POSTFIX = "postfix"
    SENDMAIL = "sendmail"
    NONE = "none"


class LearnError(UnavailableError):
    """The MTA's configuration was found but could not be read whole."""


class MtaNotFound(LearnError):
    """There is no configuration of that MTA here (so "auto" tries the next)."""


def is_domain_name(text: str) -> bool:
    return DOMAIN_NAME.fullmatch(text) is not None


def is_mailer_name(text: str) -> bool:
    return MAILER_NAME.fullmatch(text) is not None


def canonical_domain(text: str) -> str:
    """Lower case, no root dot; a leading dot (every subdomain) is kept."""
    text = text.strip().lower()
    return text[:-1] if text.endswith(".") and len(text) > 1 else text


@dataclass(frozen=True)
class LearnedClass:
    """One delivery class with what it was made of, for people to read."""

    rule: DeliveryClass
    # e.g. "relay: relay_domains (a name matches its subdomains too)".
    heading: str
    # (pattern as written, e.g. "!customer.example.org", origin).
    domains: tuple[tuple[str, str], ...]
    # (mailer, origin).
    mailers: tuple[tuple[str, str], ...]

    def has_domains(self) -> bool:
        matcher = self.rule.domains
        if isinstance(matcher, DomainSet):
            return bool(matcher)
        return any(not shown.startswith("!") for shown, _ in self.domains)


@dataclass(frozen=True)
class RouteSummary:
    """The transport_maps entries kept for one mailer word, for check-config."""

    mailer: str
    table: str
    keys: tuple[str, ...]
    count: int

    def origin(self) -> str:
        more = f" and {self.count - len(self.keys)} more" if self.count > len(self.keys) else ""
        return f"postfix transport_maps {self.table} ({', '.join(self.keys)}{more})"


@dataclass(frozen=True)
class LocalDelivery:
    """The effective delivery classes, each name with its origin."""

    classes: tuple[LearnedClass, ...]
    # Which MTA was asked, e.g. "postfix (config_directory /etc/postfix)"; "" if none.
    source: str = ""
    # transport_maps routes the classes follow, summarised per mailer.
    routes: tuple[RouteSummary, ...] = ()
    # Postfix's smtpd_sender_login_maps, learned where its tables can be
    # listed: (key, owners) as popauth.relay.ownership keeps them; and the
    # tables that could not be listed (their owners are not known).
    sender_logins: tuple[tuple[str, frozenset[str]], ...] = ()
    sender_logins_unlisted: tuple[str, ...] = ()

    @classmethod
    def configured(cls, domains: Iterable[str], mailers: Iterable[str]) -> LocalDelivery:
        return cls((configured_class(domains, [(m.lower(), CONFIGURED_MAILERS) for m in mailers]),))

    def rules(self) -> LocalDeliveryRules:
        return LocalDeliveryRules(tuple(learned.rule for learned in self.classes))

    @property
    def domains(self) -> tuple[tuple[str, str], ...]:
        """Every pattern of every class with its origin, first origin kept."""
        return first_origins(pair for learned in self.classes for pair in learned.domains)

    @property
    def mailers(self) -> tuple[tuple[str, str], ...]:
        pairs = [pair for learned in self.classes for pair in learned.mailers]
        return first_origins(pairs + [(route.mailer, route.origin()) for route in self.routes])

    def describe(self) -> list[str]:
        """Lines for ``popauth check-config``: every class, name and origin."""
        lines = [f"learned from: {self.source or 'nothing (both lists are configured)'}"]
        if self.sender_logins or self.sender_logins_unlisted:
            lines.append(f"smtpd_sender_login_maps: {len(self.sender_logins)} senders learned")
        for table in self.sender_logins_unlisted:
            lines.append(
                f"smtpd_sender_login_maps: {table} cannot be listed: pop_first_sender"
                " does not know its owners (list them in pop_first_sender_addresses)"
            )
        for learned in self.classes:
            lines.append(f"delivery class {learned.heading}")
            lines.append(" mailers:")
            lines += [f"  {mailer:<24} {origin}" for mailer, origin in learned.mailers]
            lines.append(" domains:")
            lines += [f"  {shown:<24} {origin}" for shown, origin in learned.domains]
        if self.routes:
            lines.append("transport_maps routes (the only local mailer where they apply):")
            lines += [f"  {route.mailer:<24} {route.origin()}" for route in self.routes]
        return lines


def first_origins(pairs: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """Each name once, with the first origin recorded for it."""
    seen: dict[str, str] = {}
    for name, origin in pairs:
        seen.setdefault(name, origin)
    return tuple(seen.items())


def configured_class(
    domains: Iterable[str],
    mailers: Iterable[tuple[str, str]],
    routes: TransportRoutes | None = None,
) -> LearnedClass:
    """The one class of configured ``local_domains``, with these mailers."""
    shown_domains = first_origins((canonical_domain(d), CONFIGURED_DOMAINS) for d in domains)
    shown_mailers = first_origins(mailers)
    rule = DeliveryClass(
        name="configured",
        domains=DomainSet.of(domain for domain, _ in shown_domains),
        mailers=frozenset(mailer for mailer, _ in shown_mailers),
        routes=routes,
        bare_local_parts=True,
    )
    return LearnedClass(rule, "configured: local_domains", shown_domains, shown_mailers)
