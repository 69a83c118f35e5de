"""Which envelope senders belong to which POP/IMAP users (``pop_first_sender``).

Pure: the rule, and the parser of the optional file of extra addresses. The
rule, for a login name ``U`` and a sender ``local@domain``:

- a login with no ``@`` (``joe``) owns ``joe@D`` for every domain D the MTA
  delivers here (the local domains, however they were learned);
- a login that is an address (``joe@example.org``) owns itself;
- the file ``pop_first_sender_addresses`` adds addresses per user, and
  ``@domain`` for every address of a domain;
- Postfix's ``smtpd_sender_login_maps``, where popauth learned it, adds the
  logins it names for a sender, looked up as Postfix does: the whole
  address, then the local part alone when the domain is local, then
  ``@domain``.

Domains compare case-insensitively and without a root dot, as Postfix does;
local parts compare case-insensitively too, as Postfix's table lookups and
its local delivery do (Sendmail folds local users' case likewise). User
names match caselessly (:func:`popauth.basics.usernames.user_key`), as the
block list does. The null sender is no one's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from popauth.basics.errors import InputError
from popauth.basics.usernames import is_valid_user_name, user_key
from popauth.relay.recipients import LocalDeliveryRules, normalise_domain


def sender_address(sender: str) -> tuple[str, str] | None:
    """``(local part, domain)`` of an envelope sender, folded; None for the
    null sender and for anything that is no ``local@domain``.

    Takes MAIL FROM as the MTA gives it: angle brackets and an old source
    route (``<@relay:joe@example.org>``) are dropped.
    """
    text = sender.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    if text.startswith("@") and ":" in text:
        text = text.split(":", 1)[1]
    local, at, domain = text.rpartition("@")
    if not at or not local or not domain:
        return None
    return local.lower(), normalise_domain(domain)


@dataclass(frozen=True, slots=True)
class SenderOwners:
    """The extra addresses of users: caseless user name -> folded addresses
    (``local@domain``) and domains (``@domain``)."""

    extra: tuple[tuple[str, frozenset[str]], ...] = ()
    # smtpd_sender_login_maps: folded key (address, local part, @domain) ->
    # caseless login names that own it.
    login_map: tuple[tuple[str, frozenset[str]], ...] = ()
    _by_user: Mapping[str, frozenset[str]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )
    _by_sender: Mapping[str, frozenset[str]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_user", dict(self.extra))
        object.__setattr__(self, "_by_sender", dict(self.login_map))

    def owns(self, user: str, sender: tuple[str, str], local: LocalDeliveryRules) -> bool:
        """Whether login ``user`` may send as ``sender`` (from :func:`sender_address`)."""
        local_part, domain = sender
        login_local, at, login_domain = user.rpartition("@")
        if at:
            if (login_local.lower(), normalise_domain(login_domain)) == sender:
                return True
        elif user.lower() == local_part and local.class_of(domain) is not None:
            return True
        extra = self._by_user.get(user_key(user))
        if extra is not None and (f"{local_part}@{domain}" in extra or f"@{domain}" in extra):
            return True
        return bool(self._by_sender) and user_key(user) in self._map_owners(sender, local)

    def _map_owners(self, sender: tuple[str, str], local: LocalDeliveryRules) -> frozenset[str]:
        # Postfix's search order; the first key found decides.
        local_part, domain = sender
        keys = [f"{local_part}@{domain}"]
        if local.class_of(domain) is not None:
            keys.append(local_part)
        keys.append(f"@{domain}")
        for key in keys:
            owners = self._by_sender.get(key)
            if owners is not None:
                return owners
        return frozenset()

    def owners_include(self, users: Iterable[str], sender: str, local: LocalDeliveryRules) -> bool:
        """Whether ``sender`` belongs to one of ``users``; never the null sender."""
        address = sender_address(sender)
        return address is not None and any(self.owns(user, address, local) for user in users)

    def owners_among(
        self, users: Iterable[str], sender: str, local: LocalDeliveryRules
    ) -> tuple[str, ...]:
        """Those of ``users`` who own ``sender`` (none for the null sender),
        the sender parsed once for all of them."""
        address = sender_address(sender)
        if address is None:
            return ()
        return tuple(user for user in users if self.owns(user, address, local))


def login_map_entries(entries: Iterable[tuple[str, str]]) -> tuple[tuple[str, frozenset[str]], ...]:
    """``smtpd_sender_login_maps`` entries (key, "login, login ...") as
    :attr:`SenderOwners.login_map`; the first entry of a key wins, as in a table."""
    found: dict[str, frozenset[str]] = {}
    for key, value in entries:
        folded = key.strip().lower().rstrip(".")
        owners = frozenset(user_key(login) for login in value.replace(",", " ").split())
        if folded and owners:
            found.setdefault(folded, owners)
    return tuple(found.items())


class SenderFileError(InputError):
    """A line of the addresses file is not ``user: address ...``; the message says which."""


def parse_sender_addresses(text: str) -> SenderOwners:
    """The file ``pop_first_sender_addresses``: a line per user,
    ``user: address @domain ...``; blank lines and ``#`` comments are skipped.
    A user on several lines has all their addresses."""
    owned: dict[str, set[str]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        content = line.split("#", 1)[0].strip()
        if not content:
            continue
        user, colon, rest = content.partition(":")
        user = user.strip()
        if not colon or not is_valid_user_name(user):
            raise SenderFileError(f"line {number}: not 'user: address ...'")
        addresses = rest.split()
        if not addresses:
            raise SenderFileError(f"line {number}: no address for {user}")
        for word in addresses:
            owned.setdefault(user_key(user), set()).add(_owned_address(word, number))
    return SenderOwners(tuple((user, frozenset(found)) for user, found in sorted(owned.items())))


def _owned_address(word: str, number: int) -> str:
    if word.startswith("@") and len(word) > 1 and "@" not in word[1:]:
        return f"@{normalise_domain(word[1:])}"
    address = sender_address(word)
    if address is None or word.startswith("<"):
        raise SenderFileError(f"line {number}: {word!r} is neither local@domain nor @domain")
    return f"{address[0]}@{address[1]}"
