"""Postfix's own matching, done in memory: domain lists and transport(5) lookups.

popauth judges every RCPT without asking Postfix, so it must know in
advance, exactly, what Postfix will do with a recipient domain. This module
mirrors Postfix 3.7 to 3.10 (``util/match_list.c``, ``util/match_ops.c``,
``util/valid_hostname.c``, ``trivial-rewrite/transport.c``,
``global/mail_addr_find.c``, ``global/split_addr.c``) for the data that
popauth learns: the patterns of a list, the keys of its tables, the
transport_maps entries that matter. It does no I/O; the learning is in
``popauth.localdelivery.postfix``.

Two kinds of list:

- ``mydestination``, ``virtual_alias_domains`` and ``virtual_mailbox_domains``
  are *string* lists (``match_string``): a name matches itself only, and a
  table is looked up with the whole name. ``.example.org`` matches nothing.
- ``relay_domains`` is a *domain* list (``match_hostname``): with
  parent_domain_matches_subdomains, ``example.org`` also matches every
  subdomain and a table is looked up with the name and then each parent
  (``sub.example.org``, ``example.org``, ``org``); without it,
  ``.example.org`` matches the subdomains and the parents are looked up as
  ``.example.org``, ``.org``.

In both, the first pattern that matches decides, and a ``!`` (``!!`` undoes
it) makes that decision "no": ``!customer.example.org, example.org``.
"""

from __future__ import annotations

import enum
import re
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

# Postfix folds ASCII only unless SMTPUTF8 is on; popauth matches ASCII
# hostnames only (see is_valid_hostname), so ASCII folding is exact here.
_ASCII_FOLD = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
MAX_HOSTNAME_LENGTH = 255
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_NON_NUMERIC = re.compile(r"[^0-9.]")
WILDCARD_KEY = "*"


def fold(text: str) -> str:
    """Lower-case ASCII letters only, as Postfix's casefold without SMTPUTF8."""
    return text.translate(_ASCII_FOLD)


def is_valid_hostname(name: str) -> bool:
    """Postfix's valid_hostname(): only such names reach a domain list.

    Labels of letters, digits, ``_`` and inner ``-``, up to 63 characters,
    255 in all, and not all digits. trivial-rewrite gives any other domain
    its error flag and the default class, so popauth never counts one as
    local. ASCII only: a U-label domain is not local to popauth (fail closed).
    """
    return (
        len(name) <= MAX_HOSTNAME_LENGTH
        and _HOSTNAME.fullmatch(name) is not None
        and _NON_NUMERIC.search(name) is not None
    )


def proper_parents(name: str) -> list[str]:
    """``a.b.c`` -> ``b.c``, ``c``: what follows each dot."""
    parents = []
    start = name.find(".")
    while start >= 0:
        parents.append(name[start + 1 :])
        start = name.find(".", start + 1)
    return parents


class ListKind(enum.Enum):
    # match_string(): mydestination, virtual_alias_domains, virtual_mailbox_domains.
    STRING = "string"
    # match_hostname(): relay_domains.
    DOMAIN = "domain"


@dataclass(frozen=True, slots=True)
class ListPattern:
    """One pattern of a list after Postfix's parsing (files expanded in place)."""

    positive: bool
    # A name pattern (case-folded), or the ``type:name`` of a table.
    text: str
    # The keys of a table, exactly as Postfix stores them; None for a name.
    keys: frozenset[str] | None = None


@dataclass(frozen=True)
class PostfixList:
    """A compiled Postfix domain list: ``matches`` equals Postfix's answer."""

    patterns: tuple[ListPattern, ...]
    kind: ListKind = ListKind.STRING
    parent_style: bool = False
    # Indexes built once, so that a RCPT costs a few dictionary lookups per
    # label instead of a walk over every pattern. Each maps to the position
    # of the first pattern that would match; the lowest position decides.
    _exact: dict[str, int] = field(init=False, repr=False, compare=False)
    _suffixes: dict[str, int] = field(init=False, repr=False, compare=False)
    _tables: tuple[tuple[int, frozenset[str]], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        exact: dict[str, int] = {}
        suffixes: dict[str, int] = {}
        tables: list[tuple[int, frozenset[str]]] = []
        for index, pattern in enumerate(self.patterns):
            if pattern.keys is not None:
                tables.append((index, pattern.keys))
                continue
            exact.setdefault(pattern.text, index)
            if self.kind is ListKind.DOMAIN and (self.parent_style or pattern.text[:1] == "."):
                suffixes.setdefault(pattern.text, index)
        object.__setattr__(self, "_exact", exact)
        object.__setattr__(self, "_suffixes", suffixes)
        object.__setattr__(self, "_tables", tuple(tables))

    def _parent_keys(self, name: str) -> list[str]:
        """The keys a domain list tries after the name itself."""
        if self.kind is not ListKind.DOMAIN:
            return []
        if self.parent_style:
            return proper_parents(name)
        return ["." + parent for parent in proper_parents(name)]

    def _deciding(self, name: str) -> tuple[int, str]:
        """The position of the pattern that decides for ``name`` (or len(patterns)),
        and the pattern text or table key that matched."""
        best = self._exact.get(name, len(self.patterns))
        matched = name
        parent_keys = self._parent_keys(name)
        for key in parent_keys:
            index = self._suffixes.get(key, best)
            if index < best:
                best, matched = index, key
        for index, keys in self._tables:
            if index >= best:
                break
            found = name if name in keys else next((k for k in parent_keys if k in keys), None)
            if found is not None:
                best, matched = index, found
                break
        return best, matched

    def matches(self, name: str) -> bool:
        """match_list_match() for a folded name without its root dot."""
        best, _ = self._deciding(name)
        return best < len(self.patterns) and self.patterns[best].positive

    def entry_for(self, domain: str) -> str | None:
        """The pattern or table key that puts ``domain`` in the list; for explanations."""
        if not is_valid_hostname(domain):
            return None
        best, matched = self._deciding(domain)
        if best < len(self.patterns) and self.patterns[best].positive:
            return matched
        return None

    def contains_domain(self, domain: str) -> bool:
        """For a recipient domain: only a valid hostname can be in the list."""
        return is_valid_hostname(domain) and self.matches(domain)

    def has_positive_pattern(self) -> bool:
        return any(pattern.positive for pattern in self.patterns)


class RelevantDomains:
    """Which transport_maps keys could ever apply to a domain of some classes.

    Used only to decide which entries of a big table are worth keeping, so
    it errs on the side of keeping: an entry kept needlessly costs memory,
    never a verdict. Built from the positive patterns of the lists. Called
    once per table entry, so the common answer (a remote domain: no) is
    found with one or two set lookups.
    """

    def __init__(self, names: Iterable[str], roots: Iterable[str]) -> None:
        # Domains matched by name, and domains whose whole subtree may match.
        self._names = frozenset(names)
        self._roots = frozenset(roots)
        self._above = frozenset(
            parent for name in self._names | self._roots for parent in proper_parents(name)
        )
        # The last label of every root: a domain ending otherwise is under none.
        self._root_tops = frozenset(root.rpartition(".")[2] for root in self._roots)

    @classmethod
    def of_lists(cls, lists: Iterable[PostfixList]) -> RelevantDomains:
        names: set[str] = set()
        roots: set[str] = set()
        for compiled in lists:
            subtrees = compiled.kind is ListKind.DOMAIN
            for pattern in compiled.patterns:
                if not pattern.positive:
                    continue
                for text in pattern.keys if pattern.keys is not None else (pattern.text,):
                    names.add(text)
                    if subtrees and compiled.parent_style:
                        roots.add(text)
                    elif subtrees and text.startswith("."):
                        roots.add(text[1:])
        return cls(names, roots)

    def _under_a_root(self, name: str) -> bool:
        if name.rpartition(".")[2] not in self._root_tops:
            return False
        return name in self._roots or any(p in self._roots for p in proper_parents(name))

    def covers(self, name: str) -> bool:
        """``name`` itself may be in a class."""
        return name in self._names or self._under_a_root(name)

    def covers_below(self, name: str) -> bool:
        """Some domain strictly below ``name`` may be in a class."""
        return name in self._above or self._under_a_root(name)

    def wants_key(self, key: str, parent_style: bool) -> bool:
        """Whether a transport_maps key may be looked up for a class domain."""
        at = key.rfind("@")
        if at >= 0:
            return at > 0 and self.covers(key[at + 1 :])
        if key == WILDCARD_KEY:
            return True
        if parent_style:
            return self.covers(key) or self.covers_below(key)
        if key.startswith("."):
            return self.covers_below(key[1:])
        return self.covers(key)


@dataclass(frozen=True)
class TransportRoutes:
    """The transport_maps entries that apply to class domains, and Postfix's search.

    ``entries`` maps a key to its transport (the part of the value before
    ``:``); an empty transport (``:[nexthop]``) keeps the class's own.
    """

    entries: Mapping[str, str]
    parent_style: bool = False
    recipient_delimiter: str = ""
    # Local parts Postfix never splits at the delimiter (folded).
    unsplit_local_parts: frozenset[str] = frozenset({"postmaster", "mailer-daemon"})
    owner_request_special: bool = True

    def _without_extension(self, local: str) -> str | None:
        """split_addr(): ``user+ext`` -> ``user``, or None when not split."""
        delimiters = self.recipient_delimiter
        if not delimiters or local in self.unsplit_local_parts:
            return None
        # Backwards compatibility: owner-foo and foo-request are not split at '-'.
        special = local.startswith("owner-") or (len(local) > 8 and local.endswith("-request"))
        if "-" in delimiters and self.owner_request_special and special:
            return None
        cut = next((i for i, c in enumerate(local) if c in delimiters), len(local))
        return local[:cut] if 0 < cut < len(local) else None

    def transport_for(self, address: str) -> str | None:
        """transport_lookup() for a folded ``local@domain``; None: no entry."""
        entries = self.entries
        local, _, domain = address.rpartition("@")
        found = entries.get(address)
        if found is None:
            bare = self._without_extension(local)
            if bare is not None:
                found = entries.get(f"{bare}@{domain}")
        if found is None:
            found = entries.get(domain)
        if found is None:
            for parent in proper_parents(domain):
                found = entries.get(parent if self.parent_style else "." + parent)
                if found is not None:
                    break
        if found is None:
            found = entries.get(WILDCARD_KEY)
        return found
