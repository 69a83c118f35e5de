"""The store interface shared by every whitelist backend."""

from __future__ import annotations

import abc
import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

from popauth.basics.addresses import IPAddress
from popauth.basics.errors import InputError, StartupError, UnavailableError


class StoreKind(enum.Enum):
    """Where the whitelist lives."""

    # In this process, saved to a snapshot file.
    MEMORY = "memory"
    # In Redis, shared by every host that points at it.
    REDIS = "redis"


class StoreUnavailable(UnavailableError, RuntimeError):
    """The backend cannot answer now; callers must fail closed."""


class StoreSetupError(StartupError, RuntimeError):
    """The backend answers, but is set up so that popauth cannot keep its
    promises (e.g. Redis may evict the block list): popauth does not start."""


class UserBlocked(InputError):
    """The user is on the block list: nothing was written."""


class NotConfirmed(StoreUnavailable):
    """Fewer replicas than required confirmed a change in time.

    ``undone`` tells what state that leaves: True, the change was taken back
    (a login: the client is not whitelisted); False, it stays in force where
    it was written and a failover may lose it (a block or revoke: undoing
    it would be the open door).
    """

    def __init__(self, acknowledged: int, wanted: int, *, undone: bool) -> None:
        super().__init__(f"redis: {acknowledged} of {wanted} replicas confirmed the change")
        self.acknowledged = acknowledged
        self.wanted = wanted
        self.undone = undone


class Grant(NamedTuple):
    """One user's membership of a whitelist entry: who logged in from the
    address, when, and until when that login keeps the address whitelisted.

    ``address`` is the whitelist key (for IPv6 the network address of the
    configured prefix). Times are seconds since the epoch. A named tuple,
    as :class:`Entry` is: a lookup makes one per user of the entry.
    """

    address: IPAddress
    user: str
    granted_at: float
    expires_at: float


# How many users one address holds at most unless configured otherwise
# (``max_users_per_address``): a household, an office or a hotel behind one
# NAT address rarely has more checking mail within one ttl, and the bound
# keeps one busy carrier-grade NAT address from growing without end.
MAX_USERS_PER_ADDRESS = 64


class Entry(NamedTuple):
    """A whitelisted address and every user whose login keeps it whitelisted.

    ``grants`` holds one membership per user, oldest login first (so the
    first expires soonest and the last is the newest login); never empty.
    The address is whitelisted until its last member expires.

    A named tuple, not a frozen dataclass: as immutable, and made for every
    lookup (every message) at a fraction of the cost.
    """

    address: IPAddress
    grants: tuple[Grant, ...]

    @property
    def newest(self) -> Grant:
        return self.grants[-1]

    @property
    def user(self) -> str:
        """Who logged in last (logs that name one user)."""
        return self.grants[-1].user

    @property
    def users(self) -> tuple[str, ...]:
        return tuple(grant.user for grant in self.grants)

    @property
    def granted_at(self) -> float:
        """The newest login."""
        return self.grants[-1].granted_at

    @property
    def expires_at(self) -> float:
        """When the address stops being whitelisted: its last member's expiry."""
        return max(grant.expires_at for grant in self.grants)

    def member(self, user: str) -> Grant | None:
        """``user``'s membership (the name exactly as logged in), if any."""
        for grant in self.grants:
            if grant.user == user:
                return grant
        return None


class EndReason(enum.Enum):
    """How a whitelist entry ended before a new login."""

    EXPIRED = "expired"
    # REVOKE of its address.
    REVOKED = "revoked"
    # REVOKEUSER or BLOCK of its user.
    REVOKED_WITH_USER = "revoked_with_user"
    # Pushed out to make room when the whitelist was full.
    EVICTED = "evicted"


@dataclass(frozen=True, slots=True)
class EndedGrant:
    """The last member of an address's last entry, and how and when (epoch
    seconds) the entry ended."""

    grant: Grant
    reason: EndReason
    ended_at: float


@dataclass(frozen=True, slots=True)
class GrantOutcome:
    # The user's membership, as this login wrote it.
    grant: Grant
    # The user was a member of the address already (a renewal).
    renewed: bool
    # The entry (another address) pushed out to make room when the store was full.
    evicted: Entry | None = None
    # The member pushed out of this address to make room for the user when it
    # held max_users_per_address users already: the one expiring soonest.
    displaced: Grant | None = None


@dataclass(frozen=True, slots=True)
class Renewal:
    """What one renewal of a batch did (see :meth:`WhitelistStore.renew_many`)."""

    # The user's extended membership; None when the user was no member (left alone).
    grant: Grant | None = None
    # The user is blocked: nothing was changed.
    blocked: bool = False


class BudgetSpend(NamedTuple):
    """What :meth:`WhitelistStore.spend_budget` did with one recipient."""

    # The recipient was counted: it may relay.
    allowed: bool
    # Recipients left in the window after this one (0 when refused).
    remaining: int
    # The first refusal of the window: the one to tell the operator about.
    first_refusal: bool


class BudgetUse(NamedTuple):
    """An address's relay budget now, as :meth:`WhitelistStore.budget_use` reads it."""

    # Recipients counted in the window open now (0: none open).
    used: int
    # When that window ends, seconds since the epoch; None: none is open.
    ends_at: float | None


@dataclass(frozen=True, slots=True)
class StoreStats:
    entries: int
    max_entries: int
    ttl: int
    grants: int
    renewals: int
    revocations: int
    lookups: int
    hits: int
    evictions: int

    def as_pairs(self) -> list[tuple[str, int]]:
        return [
            ("entries", self.entries),
            ("max_entries", self.max_entries),
            ("ttl", self.ttl),
            ("grants", self.grants),
            ("renewals", self.renewals),
            ("revocations", self.revocations),
            ("lookups", self.lookups),
            ("hits", self.hits),
            ("evictions", self.evictions),
        ]


class WhitelistStore(abc.ABC):
    """Grant, renew, look up and revoke whitelisted clients.

    An entry holds every user who logged in from its address within ttl,
    each with an expiry of their own (see :class:`Entry`), up to
    ``max_users_per_address`` users: a login of one more pushes out the
    member that expires soonest (every member is live, so "longest
    expired" is the one nearest its end). Users are members by their name
    exactly as logged in; the address is whitelisted while any member is.

    Implementations are safe to call from many threads at once and raise
    :class:`StoreUnavailable` (never return a made-up answer) when they cannot
    reach their data.

    A store keeps the block list's promise: :meth:`grant` and :meth:`renew`
    check the user against the block list in the same atomic step as the
    write. So a login in flight while a user is blocked either sees the
    block, or wrote its entry before the block was added, and then the
    block's :meth:`revoke_user` (which runs after the block is added)
    removes it. User names match the block list and :meth:`revoke_user`
    caselessly (:func:`popauth.basics.usernames.user_key`).
    """

    # Whether calls may wait on the network; such stores are kept off the
    # ingest endpoint's event loop.
    may_block: ClassVar[bool] = False

    @abc.abstractmethod
    def grant(self, address: IPAddress, user: str) -> GrantOutcome:
        """Make ``user`` a member of ``address``'s entry for the configured TTL.

        Adds the user (making the entry if there is none) or renews the
        user's own membership; other members are left as they are.

        Raises :class:`UserBlocked` (and writes nothing) when ``user`` is blocked.
        """

    @abc.abstractmethod
    def renew(self, address: IPAddress, user: str) -> Grant | None:
        """Extend ``user``'s live membership of ``address`` by a full TTL.

        Never creates an entry nor a membership: returns None when the user
        is no live member (expired, revoked, never granted, or only others
        logged in there), and then changes nothing. So a revoke stays in
        force until the next login. Other members are left as they are.
        The returned membership's ``granted_at`` is the time of this renewal.
        Raises :class:`UserBlocked` (and changes nothing) when ``user`` is blocked.
        """

    def renew_many(self, sessions: Sequence[tuple[IPAddress, str]]) -> list[Renewal]:
        """:meth:`renew` each ``(address, user)``, in order: one outcome each.

        Each renewal keeps :meth:`renew`'s promise on its own (the block
        check and the extension in one atomic step); a store that can do
        many in one round trip overrides this. Raises
        :class:`StoreUnavailable` when the backend cannot be asked; some of
        the sessions may have been renewed then, which is harmless: a
        renewal only extends a live entry of that user.
        """
        outcomes = []
        for address, user in sessions:
            try:
                outcomes.append(Renewal(self.renew(address, user)))
            except UserBlocked:
                outcomes.append(Renewal(blocked=True))
        return outcomes

    @abc.abstractmethod
    def lookup(self, address: IPAddress) -> Entry | None:
        """The live entry for ``address`` with every live member, or None."""

    @abc.abstractmethod
    def revoke(self, address: IPAddress) -> Entry | None:
        """Remove ``address`` with all its members; returns the entry removed, if any."""

    @abc.abstractmethod
    def revoke_user(self, user: str) -> list[Grant]:
        """Remove ``user``'s (matched caselessly) membership of every entry;
        returns the memberships removed. Other members stay; an entry whose
        last member this was is gone."""

    @abc.abstractmethod
    def entries(self) -> list[Grant]:
        """Every live membership of every entry, oldest login first (an
        address with several users appears once per user)."""

    def entry_chunks(self) -> Iterator[list[Grant]]:
        """:meth:`entries` in chunks, in the same order; a store may make each
        chunk only when it is asked for, so that few grants live at a time."""
        yield self.entries()

    @abc.abstractmethod
    def stats(self) -> StoreStats: ...

    @abc.abstractmethod
    def spend_budget(self, address: IPAddress, limit: int, window: float) -> BudgetSpend:
        """Count one relayed recipient against ``address``'s budget, in one atomic step.

        A window opens with the first recipient counted and lasts ``window``
        seconds; within it at most ``limit`` recipients are counted. One
        over that is refused and not counted; ``first_refusal`` is True for
        the first refusal of a window only. Every host sharing the store
        shares the budget. A window ends on time whether or not the address
        is still whitelisted, so budgets of addresses that are gone do not
        pile up. Raises :class:`StoreUnavailable` (and counts nothing) when
        the backend cannot be asked: the caller fails closed.
        """

    @abc.abstractmethod
    def budget_use(self, address: IPAddress) -> BudgetUse:
        """``address``'s budget now, counting nothing (``popauth query`` and ``explain``)."""

    @property
    def ends_remembered(self) -> int:
        """How many recent logins and ends :meth:`recent_end` can tell about; 0: none."""
        return 0

    def recent_end(self, address: IPAddress) -> EndedGrant | None:
        """How the last entry of ``address`` ended, if the store still remembers it.

        None when the address has a live entry, when it was never granted,
        and when the store does not remember (see :attr:`ends_remembered`).
        For ``popauth explain``: never on the path of a relay decision.
        """
        return None

    def confirm_changes(self) -> None:  # noqa: B027 - optional hook
        """Wait until the changes made so far are as durable as configured.

        Called after a block, unblock or revoke. Raises :class:`NotConfirmed`
        (with ``undone`` False: the changes stay in force) when they are not;
        a store with no replicas to wait for returns at once.
        """

    def close(self) -> None:  # noqa: B027 - optional hook, most stores hold nothing
        """Release resources; the default store holds none."""
