"""The relay decision: pure functions of what is known about one client.

The steps, in order, for every recipient:

1. accept a client that authenticated with SMTP AUTH;
2. accept a client inside ``trusted_networks``;
3. accept a client whose POP/IMAP login is still on the whitelist (unless
   ``pop_first`` is "off": then it is refused with its own reason, so that
   its user learns that POP-before-SMTP has been retired), and, with
   ``pop_first_sender = "own"``, only when the envelope sender belongs to
   one of the entry's users (:mod:`popauth.relay.ownership`): otherwise it
   is refused with its own reason, ``null_sender`` for ``<>``; in a
   phase-out campaign (:class:`Campaign`), not for a user who has graduated
   to SMTP AUTH, nor after the retirement time unless a user is exempt;
   and, with a relay budget (``pop_first_max_recipients``), only while the
   budget of its address is not spent (``client.budget``): otherwise a
   relayed recipient is tempfailed with ``budget_spent``, a local one still
   goes to step 4;
4. accept a recipient that the MTA delivers locally;
5. otherwise refuse: tempfail if the whitelist could not be read, else reject.

Steps 1-3 do not depend on the recipient, so the milter can settle them once
per connection (step 2) or once per message (steps 1 and 3) and spare the MTA
the per-recipient round trips. Nothing here does I/O or knows about pymilter.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import NamedTuple

from popauth.basics.addresses import IPAddress, NetworkSet
from popauth.relay.ownership import SenderOwners
from popauth.relay.recipients import LocalDeliveryRules, Recipient, is_local_recipient


class Verdict(enum.Enum):
    ACCEPT = "accept"
    REJECT = "reject"
    TEMPFAIL = "tempfail"


class Reason(enum.Enum):
    SMTP_AUTH = "smtp_auth"
    TRUSTED_NETWORK = "trusted_network"
    WHITELISTED = "whitelisted"
    LOCAL_RECIPIENT = "local_recipient"
    RELAY_DENIED = "relay_denied"
    WHITELIST_UNAVAILABLE = "whitelist_unavailable"
    POP_FIRST_RETIRED = "pop_first_retired"
    # pop_first_sender = "own": a whitelisted client whose sender is none of
    # the entry's users' addresses, or the null sender.
    SENDER_NOT_OWNED = "sender_not_owned"
    NULL_SENDER = "null_sender"
    # pop_first_graduate: every user the grant could be for has relayed by
    # SMTP AUTH, so POP-first no longer relays for them.
    POP_FIRST_GRADUATED = "pop_first_graduated"
    # The relay budget of a POP-first client's address is spent for this window.
    BUDGET_SPENT = "budget_spent"


class PopFirst(enum.Enum):
    """Whether POP-before-SMTP still lets clients relay."""

    ON = "on"
    # Still relays; the milter logs a deprecation event for each such message.
    WARN = "warn"
    # SMTP AUTH only; whitelisted clients get a distinct explanation.
    OFF = "off"


class PopFirstSender(enum.Enum):
    """Whether a POP-first client may send as anyone, or only as its users."""

    ANY = "any"
    # Relays, but the gate logs sender_not_owned: measure before enforcing.
    WARN = "warn"
    # Relays only when the sender belongs to one of the entry's users.
    OWN = "own"


class Listing(enum.Enum):
    """The whitelist's answer for a client."""

    LISTED = "listed"
    NOT_LISTED = "not_listed"
    UNAVAILABLE = "unavailable"
    # The store was not asked because an earlier step already settles the
    # verdict (or the client has no IP address); never grants anything.
    NOT_CONSULTED = "not_consulted"


class Budget(enum.Enum):
    """The relay budget of a POP-first client's address, for the recipient at hand."""

    # No budget applies (none configured, or the gate did not need to ask).
    NOT_COUNTED = "not_counted"
    # The recipient was counted against the budget: it may relay.
    LEFT = "left"
    # None left in this window: the recipient was not counted.
    SPENT = "spent"
    # The store could not count it; never grants anything.
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True, slots=True)
class RelayBudget:
    """At most ``max_recipients`` relayed recipients per ``window`` seconds per
    POP-first address (``pop_first_max_recipients``, ``pop_first_budget_window``)."""

    max_recipients: int
    window: float


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    reason: Reason


@dataclass(frozen=True, slots=True)
class Provenance:
    """Where each local domain and mailer came from, as ``(name, origin)`` pairs.

    Never read by the decision: only ``popauth explain`` says it. It travels
    in the policy so that a reload swaps both at once.
    """

    # Which MTA was asked, e.g. "postfix (postconf -c /etc/postfix)"; "" if none.
    source: str = ""
    domains: tuple[tuple[str, str], ...] = ()
    mailers: tuple[tuple[str, str], ...] = ()

    def origin_of_domain(self, entry: str) -> str:
        return dict(self.domains).get(entry, "")

    def origin_of_mailer(self, mailer: str) -> str:
        return dict(self.mailers).get(mailer, "")


@dataclass(frozen=True, slots=True)
class Campaign:
    """The phase-out of POP-before-SMTP: when it ends, who keeps it, who moved on.

    ``retire_at`` (epoch seconds, None: no date): before it POP-first relays
    as with ``pop_first = "warn"``, from it on it is refused as with "off",
    except for ``exempt_users`` (names exactly as the POP/IMAP logins give
    them: a looser match could lend one account's exemption to another).
    ``graduate``: a user who has relayed by SMTP AUTH (the client's
    ``graduated_users``) relays by POP-first no more.
    """

    retire_at: float | None = None
    exempt_users: frozenset[str] = frozenset()
    graduate: bool = False

    def retired(self, now: float) -> bool:
        return self.retire_at is not None and now >= self.retire_at

    def exempts(self, user: str) -> bool:
        return user in self.exempt_users


@dataclass(frozen=True, slots=True)
class RelayPolicy:
    trusted_networks: NetworkSet
    local_delivery: LocalDeliveryRules
    pop_first: PopFirst = PopFirst.ON
    provenance: Provenance = Provenance()
    pop_first_sender: PopFirstSender = PopFirstSender.ANY
    sender_owners: SenderOwners = field(default_factory=SenderOwners)
    campaign: Campaign = Campaign()
    # None: POP-first clients relay to any number of recipients.
    pop_first_budget: RelayBudget | None = None


class Client(NamedTuple):
    """What is known of the client when a message is decided.

    A named tuple, not a frozen dataclass: as immutable, and built for every
    message at half the cost.
    """

    address: IPAddress | None
    auth_user: str = ""
    listing: Listing = Listing.NOT_CONSULTED
    # Who logged in to POP/IMAP from this client last; for the log only.
    login_user: str = ""
    # Every user of the client's whitelist entry, and the envelope sender
    # ("" the null sender; None not known, which "own" refuses).
    login_users: tuple[str, ...] = ()
    sender: str | None = None
    # The moment of the decision (epoch seconds), compared with the campaign's
    # retire_at; unknown counts as after any date: fail closed.
    now: float = math.inf
    # Those of login_users who have graduated to SMTP AUTH (pop_first_graduate).
    graduated_users: frozenset[str] = frozenset()
    # The relay budget for the recipient at hand (see Budget).
    budget: Budget = Budget.NOT_COUNTED


ACCEPT_AUTHENTICATED = Decision(Verdict.ACCEPT, Reason.SMTP_AUTH)
ACCEPT_TRUSTED = Decision(Verdict.ACCEPT, Reason.TRUSTED_NETWORK)
ACCEPT_WHITELISTED = Decision(Verdict.ACCEPT, Reason.WHITELISTED)
ACCEPT_LOCAL = Decision(Verdict.ACCEPT, Reason.LOCAL_RECIPIENT)
REJECT_RELAY = Decision(Verdict.REJECT, Reason.RELAY_DENIED)
TEMPFAIL_UNAVAILABLE = Decision(Verdict.TEMPFAIL, Reason.WHITELIST_UNAVAILABLE)
REJECT_POP_FIRST_RETIRED = Decision(Verdict.REJECT, Reason.POP_FIRST_RETIRED)
REJECT_SENDER_NOT_OWNED = Decision(Verdict.REJECT, Reason.SENDER_NOT_OWNED)
REJECT_NULL_SENDER = Decision(Verdict.REJECT, Reason.NULL_SENDER)
REJECT_POP_FIRST_GRADUATED = Decision(Verdict.REJECT, Reason.POP_FIRST_GRADUATED)
TEMPFAIL_BUDGET_SPENT = Decision(Verdict.TEMPFAIL, Reason.BUDGET_SPENT)

# The budget states that let a POP-first grant stand.
_BUDGET_GRANTS = frozenset({Budget.NOT_COUNTED, Budget.LEFT})


def decide_connection(policy: RelayPolicy, address: IPAddress | None) -> Decision | None:
    """Step 2, the only step that holds for a whole connection."""
    if address is not None and address in policy.trusted_networks:
        return ACCEPT_TRUSTED
    return None


def decides_at_connection(policy: RelayPolicy) -> bool:
    """Whether step 2 can settle anything at all: only with trusted networks."""
    return bool(policy.trusted_networks)


def needs_whitelist(policy: RelayPolicy, address: IPAddress | None, auth_user: str) -> bool:
    """Whether step 3 could change the outcome, i.e. the store is worth asking."""
    return bool(address is not None and not auth_user and address not in policy.trusted_networks)


def decide_sender(policy: RelayPolicy, client: Client) -> Decision | None:
    """Steps 1-3: a verdict for every recipient of the message, or None."""
    if client.auth_user:
        return ACCEPT_AUTHENTICATED
    trusted = decide_connection(policy, client.address)
    if trusted is not None:
        return trusted
    if _pop_first_grants(policy, client):
        return ACCEPT_WHITELISTED
    return None


def _pop_first_grants(policy: RelayPolicy, client: Client) -> bool:
    return (
        _pop_first_listed(policy, client)
        and client.budget in _BUDGET_GRANTS
        and pop_first_refusal(policy, client) is None
    )


def _pop_first_listed(policy: RelayPolicy, client: Client) -> bool:
    return client.address is not None and client.listing is Listing.LISTED


def pop_first_refusal(policy: RelayPolicy, client: Client) -> Decision | None:
    """The refusal a whitelisted client earns, or None: POP-first relays it.

    An entry may hold several users behind one address, and without
    ``pop_first_sender = "own"`` nothing says which of them sends: the
    grant stands while any of them could be the sender under the rules,
    just as the address's grant stands today. With "own" the users who own
    the sender decide, so that a stranger gains nothing from a neighbour.
    """
    if policy.pop_first is PopFirst.OFF:
        return REJECT_POP_FIRST_RETIRED
    if policy.pop_first_sender is not PopFirstSender.OWN:
        return _campaign_refusal(policy.campaign, _entry_users(client), client)
    sender = client.sender
    if sender is not None and _is_null_sender(sender):
        return REJECT_NULL_SENDER
    owners = (
        ()
        if sender is None
        else policy.sender_owners.owners_among(client.login_users, sender, policy.local_delivery)
    )
    if not owners:
        return REJECT_SENDER_NOT_OWNED
    return _campaign_refusal(policy.campaign, owners, client)


def address_refusal(policy: RelayPolicy, client: Client) -> Decision | None:
    """:func:`pop_first_refusal` for a door that never sees the sender (the
    socketmap): ``pop_first = "off"`` and the campaign, over every user of
    the entry."""
    if policy.pop_first is PopFirst.OFF:
        return REJECT_POP_FIRST_RETIRED
    return _campaign_refusal(policy.campaign, _entry_users(client), client)


def _entry_users(client: Client) -> tuple[str, ...]:
    return client.login_users or (client.login_user,)


def _campaign_refusal(
    campaign: Campaign, users: tuple[str, ...], client: Client
) -> Decision | None:
    """The phase-out's refusal of a grant that ``users`` could be sending by."""
    if not campaign.graduate and campaign.retire_at is None:
        return None  # no campaign: nothing more to ask, at no cost per message
    if campaign.graduate:
        users = tuple(user for user in users if user not in client.graduated_users)
        if not users:
            return REJECT_POP_FIRST_GRADUATED
    if campaign.retired(client.now) and not any(campaign.exempts(user) for user in users):
        return REJECT_POP_FIRST_RETIRED
    return None


def _is_null_sender(sender: str) -> bool:
    return sender.strip() in ("", "<>")


def sender_refusal(policy: RelayPolicy, client: Client) -> Decision | None:
    """The refusal the sender earns a POP-first client, were it enforced; None:
    the sender is one of the entry's users' (or ``pop_first_sender`` is "any").

    With "warn" the gate logs it and relays; with "own" it refuses.
    """
    if policy.pop_first_sender is PopFirstSender.ANY:
        return None
    sender = client.sender
    if sender is not None and _is_null_sender(sender):
        return REJECT_NULL_SENDER
    if sender is not None and policy.sender_owners.owners_include(
        client.login_users, sender, policy.local_delivery
    ):
        return None
    return REJECT_SENDER_NOT_OWNED


def decide_recipient(policy: RelayPolicy, client: Client, recipient: Recipient) -> Decision:
    """All five steps for one recipient."""
    settled = decide_sender(policy, client)
    if settled is not None:
        return settled
    return decide_unsettled_recipient(policy, client, recipient)


def decide_unsettled_recipient(
    policy: RelayPolicy, client: Client, recipient: Recipient
) -> Decision:
    """Steps 4-5, for a client that :func:`decide_sender` did not settle.

    The milter judges the sender once per message at MAIL FROM and only this
    part at each RCPT TO.
    """
    if is_local_recipient(recipient, policy.local_delivery):
        return ACCEPT_LOCAL
    if client.listing is Listing.UNAVAILABLE:
        return TEMPFAIL_UNAVAILABLE
    if _pop_first_listed(policy, client):
        # Listed, but refused: retired, graduated, not this sender ("own"),
        # or past its relay budget.
        return (
            pop_first_refusal(policy, client) or _budget_refusal(client) or REJECT_POP_FIRST_RETIRED
        )
    return REJECT_RELAY


def _budget_refusal(client: Client) -> Decision | None:
    """The refusal of a relayed recipient that the budget alone stands in the way of."""
    if client.budget is Budget.SPENT:
        return TEMPFAIL_BUDGET_SPENT
    if client.budget is Budget.UNAVAILABLE:
        return TEMPFAIL_UNAVAILABLE
    return None
