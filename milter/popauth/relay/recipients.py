"""Is a recipient delivered here, or relayed onwards?

The text of an address is not enough: ``user%remote@local.test``,
``remote!user@local.test``, ``"user@remote"@local.test`` and source routes all
end in a local domain, yet an MTA with default settings rewrites them and
relays the mail. So a recipient counts as local only when every witness
agrees: the envelope text is a plain address, the address the MTA resolved
(``{rcpt_addr}``) is too, both domains are in the same *delivery class*
(Postfix's address classes: local, virtual alias, virtual mailbox, relay),
and the MTA's own transport word (``{rcpt_mailer}``) is the one that class
delivers that address with. Anything odd counts as relayed, which at worst
refuses mail from a stranger; it never lets one relay.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from popauth.relay.postfixlists import TransportRoutes, fold

# Characters that route mail onwards from inside a local part (percent hack,
# bang paths, nested at-signs) or hide such routing (quoting, escapes).
_ROUTING_CHARACTERS = frozenset('@%!"\\')


def normalise_domain(domain: str) -> str:
    """Domains compare case-insensitively and without one root dot (as Postfix)."""
    domain = domain.strip().lower()
    return domain[:-1] if domain.endswith(".") else domain


class DomainMatcher(Protocol):
    """The domains of one delivery class."""

    def contains_domain(self, domain: str) -> bool:
        """``domain`` is normalised (see normalise_domain)."""
        ...

    def entry_for(self, domain: str) -> str | None:
        """The listed entry that puts ``domain`` here, or None; for explanations."""
        ...


@dataclass(frozen=True, slots=True)
class DomainSet:
    """Configured local domains: exact names, and ``.example.org`` for every subdomain."""

    names: frozenset[str] = frozenset()
    parents: tuple[str, ...] = ()

    @classmethod
    def of(cls, domains: Iterable[str]) -> DomainSet:
        names: set[str] = set()
        parents: list[str] = []
        for domain in domains:
            if domain.startswith("."):
                parents.append("." + normalise_domain(domain[1:]))
            else:
                names.add(normalise_domain(domain))
        return cls(frozenset(names), tuple(parents))

    def contains_domain(self, domain: str) -> bool:
        # endswith takes the tuple at once: no generator for every recipient.
        return domain in self.names or (bool(self.parents) and domain.endswith(self.parents))

    def __contains__(self, domain: object) -> bool:
        return isinstance(domain, str) and self.contains_domain(normalise_domain(domain))

    def __bool__(self) -> bool:
        return bool(self.names or self.parents)

    def entry_for(self, domain: str) -> str | None:
        """The listed name that makes ``domain`` local (``.example.org`` for a
        subdomain), or None; for explanations, not for deciding."""
        name = normalise_domain(domain)
        if name in self.names:
            return name
        return next((parent for parent in self.parents if name.endswith(parent)), None)


@dataclass(frozen=True, slots=True)
class DeliveryClass:
    """One way the MTA delivers here: its domains, and the mailers it uses for them.

    ``routes`` are the MTA's per-address and per-domain exceptions (Postfix's
    transport_maps): where one applies, its transport is the only local
    mailer for that address; elsewhere ``mailers`` are.
    """

    name: str
    domains: DomainMatcher
    mailers: frozenset[str]
    routes: TransportRoutes | None = None
    # A recipient with no domain at all (Sendmail's bare local user) is here.
    bare_local_parts: bool = False

    def expected_mailers(self, address: str | None) -> frozenset[str]:
        """The mailers for a folded ``local@domain`` (None: a bare local part)."""
        if self.routes is None or address is None:
            return self.mailers
        transport = self.routes.transport_for(address)
        # No entry, or ":nexthop" (an empty transport): the class's own.
        return frozenset({transport.lower()}) if transport else self.mailers


@dataclass(frozen=True, slots=True)
class LocalDeliveryRules:
    """Every delivery class, in the MTA's order: the first whose domains match decides."""

    classes: tuple[DeliveryClass, ...] = ()
    # Every mailer any class could expect: most relayed mail is told by its
    # mailer alone, without looking at the address.
    mailers: frozenset[str] = field(init=False, default=frozenset())

    def __post_init__(self) -> None:
        words: set[str] = set()
        for each in self.classes:
            words |= each.mailers
            if each.routes is not None:
                words |= {word.lower() for word in each.routes.entries.values() if word}
        object.__setattr__(self, "mailers", frozenset(words))

    @classmethod
    def configured(cls, domains: Iterable[str], mailers: Iterable[str]) -> LocalDeliveryRules:
        """One class: these domains with these mailers (``local_domains``/``local_mailers``)."""
        words = frozenset(mailer.lower() for mailer in mailers)
        return cls((DeliveryClass("configured", DomainSet.of(domains), words, None, True),))

    def class_of(self, domain: str) -> DeliveryClass | None:
        return next((c for c in self.classes if c.domains.contains_domain(domain)), None)

    def bare_class(self) -> DeliveryClass | None:
        return next((c for c in self.classes if c.bare_local_parts), None)


@dataclass(frozen=True, slots=True)
class Recipient:
    """What the MTA tells the milter about one RCPT."""

    envelope: str
    mailer: str | None = None
    resolved: str | None = None


def plain_address_parts(address: str) -> tuple[str, str | None] | None:
    """Split a plain mailbox into (local part, domain or None).

    Returns None for anything that routes mail onwards or hides routing:
    source routes, quoted or escaped local parts, ``%``, ``!`` and a second
    ``@``. The empty address and the null sender are not mailboxes either.
    """
    return _plain_parts(_mailbox_text(address))


def _mailbox_text(address: str) -> str:
    """The text of an address inside its blanks and angle brackets."""
    text = address.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    return text


def _plain_parts(text: str) -> tuple[str, str | None] | None:
    if not text or text.startswith("@"):
        return None
    local, at, domain = text.rpartition("@")
    if not at:
        local, domain_or_none = text, None
    else:
        if not domain:
            return None
        domain_or_none = domain
    if not local or not _ROUTING_CHARACTERS.isdisjoint(local):
        return None
    if domain_or_none is not None and not _ROUTING_CHARACTERS.isdisjoint(domain_or_none):
        return None
    return local, domain_or_none


@dataclass(frozen=True, slots=True)
class Classified:
    """A plain recipient and the delivery class its domain is in."""

    delivery_class: DeliveryClass
    # The domain the class was chosen by: the resolved one, else the envelope's.
    domain: str | None
    # Folded ``local@domain`` the MTA routes by; None for a bare local part.
    address: str | None


def _parts(text: str) -> tuple[str, str | None] | None:
    """Local part and normalised domain of an address's ``_mailbox_text``."""
    parts = _plain_parts(text)
    if parts is None:
        return None
    local, domain = parts
    return local, None if domain is None else normalise_domain(domain)


def classify(recipient: Recipient, rules: LocalDeliveryRules) -> Classified | None:
    """The class of a plain recipient, or None (disguised, or in no class)."""
    envelope_text = _mailbox_text(recipient.envelope)
    envelope = _parts(envelope_text)
    if envelope is None:
        return None
    routed = envelope
    if recipient.resolved is not None:
        resolved_text = _mailbox_text(recipient.resolved)
        # Mostly the envelope's very address: its parts are known already.
        resolved = envelope if resolved_text == envelope_text else _parts(resolved_text)
        if resolved is None:
            return None
        # Sendmail hands the local mailer a bare user: the envelope names the domain.
        if resolved[1] is not None:
            routed = resolved
    local, domain = routed
    chosen = rules.bare_class() if domain is None else rules.class_of(domain)
    if chosen is None:
        return None
    if envelope[1] not in (None, domain) and not chosen.domains.contains_domain(envelope[1]):
        return None
    address = None if domain is None else f"{fold(local)}@{domain}"
    return Classified(chosen, domain, address)


def is_local_recipient(recipient: Recipient, rules: LocalDeliveryRules) -> bool:
    """True only when the MTA will deliver this recipient here."""
    if recipient.mailer is None:
        return False
    mailer = recipient.mailer.lower()
    if mailer not in rules.mailers:
        return False
    found = classify(recipient, rules)
    return found is not None and mailer in found.delivery_class.expected_mailers(found.address)
