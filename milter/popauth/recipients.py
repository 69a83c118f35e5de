"""Is a recipient delivered here, or relayed onwards?

The text of an address is not enough: ``user%remote@local.test``,
``remote!user@local.test``, ``"user@remote"@local.test`` and source routes all
end in a local domain, yet an MTA with default settings rewrites them and
relays the mail. So a recipient counts as local only when every witness
agrees: the MTA's own transport word (``{rcpt_mailer}``) is a local one, the
envelope text is a plain address in a local domain, and the address the MTA
resolved (``{rcpt_addr}``) is too. Anything odd counts as relayed, which at
worst refuses mail from a stranger; it never lets one relay.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

# Characters that route mail onwards from inside a local part (percent hack,
# bang paths, nested at-signs) or hide such routing (quoting, escapes).
_ROUTING_CHARACTERS = frozenset('@%!"\\')


def normalise_domain(domain: str) -> str:
    """Domains compare case-insensitively and without the root dot."""
    return domain.strip().rstrip(".").lower()


@dataclass(frozen=True, slots=True)
class DomainSet:
    """Local domains: exact names, and ``.example.org`` for every subdomain."""

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

    def __contains__(self, domain: object) -> bool:
        if not isinstance(domain, str):
            return False
        name = domain.strip().rstrip(".").lower()  # normalise_domain, inlined: every RCPT
        if name in self.names:
            return True
        return bool(self.parents) and name.endswith(self.parents)

    def __bool__(self) -> bool:
        return bool(self.names or self.parents)

    def entry_for(self, domain: str) -> str | None:
        """The listed name that makes ``domain`` local (``.example.org`` for a
        subdomain), or None; for explanations, not for deciding."""
        name = normalise_domain(domain)
        if name in self.names:
            return name
        return next((parent for parent in self.parents if name.endswith(parent)), None)


class Recipient(NamedTuple):
    """What the MTA tells the milter about one RCPT (a named tuple: built for
    every RCPT, at half the cost of a frozen dataclass)."""

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


def _is_plainly_local(text: str, local_domains: DomainSet) -> bool:
    parts = _plain_parts(text)
    if parts is None:
        return False
    _, domain = parts
    # A bare local part (``postmaster``) is completed by the MTA with its own
    # domain; the mailer check decides whether that is delivered here.
    return domain is None or domain in local_domains


def is_local_recipient(
    recipient: Recipient, local_domains: DomainSet, local_mailers: frozenset[str]
) -> bool:
    """True only when the MTA will deliver this recipient locally."""
    mailer = recipient.mailer
    if mailer is None or mailer.lower() not in local_mailers:
        return False
    envelope = _mailbox_text(recipient.envelope)
    if not _is_plainly_local(envelope, local_domains):
        return False
    if recipient.resolved is None:
        return True
    resolved = _mailbox_text(recipient.resolved)
    # Mostly the very address of the envelope: the same answer, known already.
    return resolved == envelope or _is_plainly_local(resolved, local_domains)
