"""``popauth explain``: the milter's verdict for one client and recipient, and why.

The verdict comes from the relay gate itself (:meth:`RelayGate.assess`:
the same store lookup and the same pure decision as a real message), the
reply text from :mod:`popauth.relay.replies`, as the adapter sends it. This
module only gathers what else an operator needs to read the verdict (how
the last whitelist entry ended, which users are blocked, where each local
domain and mailer came from) and says it in plain lines.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass

from popauth.basics.addresses import IPAddress, WhitelistKeying
from popauth.basics.clock import Clock, how_long, utc_text
from popauth.basics.escaping import escape_text, escape_user_name
from popauth.relay.decision import (
    Campaign,
    Listing,
    PopFirst,
    PopFirstSender,
    Reason,
    RelayPolicy,
    sender_refusal,
)
from popauth.relay.gate import Assessment, RelayGate
from popauth.relay.recipients import (
    Classified,
    Recipient,
    classify,
    is_local_recipient,
    plain_address_parts,
)
from popauth.relay.replies import Replies, SmtpReply
from popauth.store import EndedGrant, EndReason, Entry, WhitelistStore

# How many local domains a line names before "and N more".
_SHOWN_DOMAINS = 5

_STAGES = {
    "connect": "at CONNECT, for the whole connection",
    "mail": "at MAIL FROM, for every recipient of the message",
    "rcpt": "at RCPT TO, for this recipient",
}

_ENDINGS = {
    EndReason.EXPIRED: "it expired at {at}",
    EndReason.REVOKED: "a REVOKE of the address removed it at {at}",
    EndReason.REVOKED_WITH_USER: "a REVOKEUSER or BLOCK of its user removed it at {at}",
    EndReason.EVICTED: "it was pushed out at {at} to make room: the whitelist was full",
}


@dataclass(frozen=True, slots=True)
class Question:
    """What the operator asks: a client address and a recipient, and optionally
    the POP/IMAP user expected there, the SMTP AUTH name, the sender and the
    MTA's ``{rcpt_mailer}`` for the recipient."""

    address: IPAddress
    recipient: str
    user: str = ""
    auth_user: str = ""
    sender: str = ""
    mailer: str = ""


@dataclass(frozen=True, slots=True)
class Facts:
    """Everything an explanation says, gathered at one moment (``now``, epoch)."""

    question: Question
    described: str
    assessment: Assessment
    recipient: Recipient
    mailer_assumed: bool
    ended: EndedGrant | None
    ends_remembered: int
    blocked: frozenset[str]
    reply: SmtpReply | None
    now: float


class Explainer:
    """Answers ``EXPLAIN`` on the ingest socket from the live gate, store and block list."""

    def __init__(
        self,
        *,
        gate: RelayGate,
        store: WhitelistStore,
        keying: WhitelistKeying,
        blocked: Container[str],
        replies: Replies,
        clock: Clock,
    ) -> None:
        self._gate = gate
        self._store = store
        self._keying = keying
        self._blocked = blocked
        self._replies = replies
        self._clock = clock

    def explain(self, question: Question) -> list[str]:
        return explanation_lines(self.facts(question))

    def facts(self, question: Question) -> Facts:
        policy = self._gate.policy
        recipient, assumed = recipient_as_the_mta_gives_it(question, policy)
        assessment = self._gate.assess(
            question.address, question.auth_user, recipient, question.sender or None
        )
        key = self._keying.key_address(question.address)
        ended = None
        if assessment.grant is None and assessment.client.listing is not Listing.UNAVAILABLE:
            ended = self._store.recent_end(key)
        concerned = {question.user, question.auth_user}
        if assessment.grant is not None:
            concerned.update(assessment.grant.users)
        if ended is not None:
            concerned.add(ended.grant.user)
        blocked = frozenset(user for user in concerned if user and user in self._blocked)
        return Facts(
            question=question,
            described=self._keying.describe(key),
            assessment=assessment,
            recipient=recipient,
            mailer_assumed=assumed,
            ended=ended,
            ends_remembered=self._store.ends_remembered,
            blocked=blocked,
            reply=self._replies.refusal(assessment.decision),
            now=self._clock.time(),
        )


def recipient_as_the_mta_gives_it(
    question: Question, policy: RelayPolicy
) -> tuple[Recipient, bool]:
    """The recipient with its ``{rcpt_mailer}``, and whether that mailer is assumed.

    Without ``--mailer``, a recipient plainly in a delivery class is assumed
    to arrive with the mailer that class delivers it with (the MTA agrees
    with its own lists); any other recipient needs none, since its domain
    already makes it relayed.
    """
    if question.mailer:
        return Recipient(question.recipient, question.mailer), False
    found = classify(Recipient(question.recipient), policy.local_delivery)
    if found is None:
        return Recipient(question.recipient), True
    expected = found.delivery_class.expected_mailers(found.address)
    in_order = [mailer for mailer, _ in policy.provenance.mailers if mailer in expected]
    mailers = in_order or sorted(expected)
    if not mailers:
        return Recipient(question.recipient), True
    return Recipient(question.recipient, mailers[0]), True


# --- the lines ---------------------------------------------------------------


def explanation_lines(facts: Facts) -> list[str]:
    lines = [_verdict_line(facts), _reply_line(facts), _whitelist_line(facts)]
    lines += _user_lines(facts)
    lines.append(_recipient_line(facts))
    sender = _sender_line(facts)
    if sender:
        lines.append(sender)
    budget = _budget_line(facts)
    if budget:
        lines.append(budget)
    lines += _campaign_lines(facts)
    return lines


def retirement_line(campaign: Campaign, now: float) -> str:
    """When POP-first is retired (``pop_first_retire_at``), and how long is left; "" unset."""
    if campaign.retire_at is None:
        return ""
    stamp = utc_text(campaign.retire_at)
    moment = f"{stamp} ({how_long(campaign.retire_at - now)})"
    if campaign.retired(now):
        return f"pop_first_retire_at: retired at {moment}: POP-first relays only for exempt users"
    return (
        f"pop_first_retire_at: retires at {moment}: until then it relays,"
        " each relay logged (pop_first_deprecated)"
    )


def _campaign_lines(facts: Facts) -> list[str]:
    """The phase-out's part: the date, and which of the entry's users it spares or refuses."""
    policy = facts.assessment.policy
    campaign = policy.campaign
    lines = []
    retirement = retirement_line(campaign, facts.now)
    if retirement:
        lines.append(retirement)
    entry = facts.assessment.grant
    if entry is None:
        return lines
    exempt = [user for user in entry.users if campaign.exempts(user)]
    if exempt and campaign.retire_at is not None:
        lines.append(
            f"exempt: {', '.join(_shown(user) for user in exempt)} keep POP-first after the date"
            " (pop_first_exempt_users)"
        )
    if campaign.graduate:
        graduated = sorted(facts.assessment.client.graduated_users)
        for user in graduated:
            shown = _shown(user)
            lines.append(
                f"graduated: {shown} has relayed by SMTP AUTH, so POP-first no longer relays"
                f" for them (pop_first_graduate; undo: popauth pop-first reinstate {shown})"
            )
    return lines


def _budget_line(facts: Facts) -> str:
    """The relay budget of a POP-first client's address, as read (explain spends none)."""
    assessment = facts.assessment
    limit = assessment.policy.pop_first_budget
    if not assessment.budget_applies or limit is None:
        return ""
    use = assessment.budget
    if use is None:
        return (
            "budget: the store cannot be read now, so relayed recipients get a temporary"
            " failure (see popauth's log: whitelist_unavailable)"
        )
    left = max(limit.max_recipients - use.used, 0)
    terms = f"{limit.max_recipients} per {_relative(limit.window)[3:]}"
    if is_local_recipient(facts.recipient, assessment.policy.local_delivery):
        terms += "; local recipients are not counted"
    if use.ends_at is None:
        return f"budget: {left} relayed recipients left ({terms}); the next one opens a window"
    until = _moment(use.ends_at, facts.now)
    if left:
        return f"budget: {left} relayed recipients left ({terms}), until {until}"
    return f"budget: spent ({terms}): relayed recipients get 451 4.7.1 until {until}"


def _sender_line(facts: Facts) -> str:
    """What pop_first_sender makes of the sender, for a whitelisted client."""
    assessment = facts.assessment
    policy = assessment.policy
    shown = escape_text(facts.question.sender)
    entry = assessment.grant
    if policy.pop_first_sender is PopFirstSender.ANY or entry is None:
        if not shown:
            return ""
        return (
            f"sender: {shown} is not part of the decision"
            f" (pop_first_sender = {policy.pop_first_sender.value!r}"
            + ("" if entry is None else ": a POP-first client may send as anyone")
            + ")"
        )
    mode = f"pop_first_sender = {policy.pop_first_sender.value!r}"
    refusal = sender_refusal(policy, assessment.client)
    if refusal is None:
        return f"sender: {shown} belongs to a user of the entry ({mode})"
    if not shown:
        return f"sender: not given (--sender): {mode} judges MAIL FROM"
    enforced = policy.pop_first_sender is PopFirstSender.OWN
    what = "the null sender" if refusal.reason is Reason.NULL_SENDER else shown
    owners = ", ".join(_shown(user) for user in entry.users)
    ending = "refused" if enforced else "relayed, and logged as sender_not_owned"
    return f"sender: {what} belongs to none of the entry's users ({owners}): {ending} ({mode})"


def _verdict_line(facts: Facts) -> str:
    decision = facts.assessment.decision
    return (
        f"verdict: {decision.verdict.value} ({decision.reason.value}),"
        f" {_STAGES[facts.assessment.stage]}"
    )


def _reply_line(facts: Facts) -> str:
    if facts.reply is not None:
        return f"reply: {facts.reply}"
    if facts.assessment.decision.reason is Reason.LOCAL_RECIPIENT:
        return "reply: none from popauth: the MTA goes on with this recipient (its own checks)"
    return "reply: none from popauth: the MTA goes on with the message (its own checks)"


def _whitelist_line(facts: Facts) -> str:
    assessment = facts.assessment
    client = assessment.client
    address = facts.question.address
    subject = (
        facts.described if facts.described == str(address) else f"{facts.described} ({address})"
    )
    if assessment.stage == "connect":
        network = _trusted_network(assessment.policy, address)
        return f"whitelist: not consulted: {address} is in trusted_networks ({network})"
    if client.listing is Listing.NOT_CONSULTED:
        user = escape_user_name(facts.question.auth_user)
        return f"whitelist: not consulted: the client authenticated with SMTP AUTH as {user}"
    if client.listing is Listing.UNAVAILABLE:
        return (
            "whitelist: the store cannot be read now, so refused recipients get a temporary"
            " failure (see popauth's log: whitelist_unavailable)"
        )
    if assessment.grant is not None:
        line = f"whitelist: {subject}: {_entry(assessment.grant, facts.now)}"
        if assessment.decision.reason is Reason.POP_FIRST_RETIRED or (
            assessment.decision.reason is Reason.LOCAL_RECIPIENT
            and not _pop_first_relays(assessment.policy, facts.now)
        ):
            if assessment.policy.pop_first is PopFirst.OFF:
                line += '; pop_first = "off": a POP/IMAP login no longer lets anyone relay'
            else:
                line += (
                    "; pop_first_retire_at has passed: a POP/IMAP login lets only exempt"
                    " users relay"
                )
        return line
    return f"whitelist: {subject} has no entry: {_why_none(facts)}"


def _entry(entry: Entry, now: float) -> str:
    """Every user of the entry, oldest login first, each with their own expiry."""
    if len(entry.grants) == 1:
        grant = entry.newest
        return (
            f"{_shown(grant.user)} logged in at {_moment(grant.granted_at, now)};"
            f" the entry expires at {_moment(grant.expires_at, now)}"
        )
    members = ", ".join(
        f"{_shown(grant.user)} (logged in at {_moment(grant.granted_at, now)},"
        f" until {_moment(grant.expires_at, now)})"
        for grant in entry.grants
    )
    return (
        f"{len(entry.grants)} users logged in: {members};"
        f" the entry expires at {_moment(entry.expires_at, now)}, with its last user"
    )


def _shown(user: str) -> str:
    return escape_user_name(user) or "(no user name)"


def _why_none(facts: Facts) -> str:
    ended = facts.ended
    if ended is not None:
        grant = ended.grant
        user = escape_user_name(grant.user) or "(no user name)"
        ending = _ENDINGS[ended.reason].format(at=_moment(ended.ended_at, facts.now))
        return f"{ending}; it was {user}'s, from a login at {_moment(grant.granted_at, facts.now)}"
    if facts.ends_remembered:
        return (
            "never granted since popauth started, as far as it remembers"
            f" (the last {facts.ends_remembered} addresses that logged in or lost their entry)"
        )
    return (
        "never granted, expired or revoked: this store keeps no record of ended entries,"
        " so popauth cannot tell which"
    )


def _user_lines(facts: Facts) -> list[str]:
    lines = []
    question = facts.question
    for user in sorted(facts.blocked):
        shown = escape_user_name(user)
        if user == question.auth_user and user != question.user:
            lines.append(
                f"user: {shown} is blocked, but a block refuses POP/IMAP logins only:"
                " SMTP AUTH is the MTA's to refuse"
            )
        else:
            lines.append(
                f"user: {shown} is blocked: their POP/IMAP logins are refused and whitelist"
                f" nothing (popauth unblock {shown})"
            )
    if question.user and question.user not in facts.blocked:
        lines.append(f"user: {escape_user_name(question.user)} is not blocked")
    live = facts.assessment.grant
    users = (
        live.users if live is not None else () if facts.ended is None else (facts.ended.grant.user,)
    )
    if question.user and users and question.user not in users:
        owners = " and ".join(f"{_shown(user)}'s" for user in users)
        lines.append(f"user: the entry is {owners}, not {escape_user_name(question.user)}'s")
    return lines


def _recipient_line(facts: Facts) -> str:
    policy = facts.assessment.policy
    recipient = facts.recipient
    local = is_local_recipient(recipient, policy.local_delivery)
    why = _why_local(facts) if local else _why_relayed(facts)
    line = f"recipient: {recipient.envelope} {'is local' if local else 'is relayed'}: {why}"
    if facts.assessment.stage != "rcpt":
        line += " (the verdict does not depend on it)"
    return line


def _why_local(facts: Facts) -> str:
    policy = facts.assessment.policy
    recipient = facts.recipient
    found = classify(recipient, policy.local_delivery)
    if found is None or found.domain is None:
        where = "a bare local part, completed with the MTA's own domain"
    else:
        entry = found.delivery_class.domains.entry_for(found.domain) or found.domain
        where = f"domain {entry}{_origin(policy.provenance.origin_of_domain(entry))}"
        if found.delivery_class.name != "configured":
            where += f" (delivery class {found.delivery_class.name})"
    mailer = (recipient.mailer or "").lower()
    said = f"{where}, mailer {mailer}{_origin(policy.provenance.origin_of_mailer(mailer))}"
    if facts.mailer_assumed:
        said += " (the mailer is assumed: --mailer names the {rcpt_mailer} the MTA uses)"
    return said


def _why_relayed(facts: Facts) -> str:
    policy = facts.assessment.policy
    recipient = facts.recipient
    parts = plain_address_parts(recipient.envelope)
    if parts is None:
        return "not a plain mailbox (%, !, quotes or a source route route mail onwards)"
    found = classify(recipient, policy.local_delivery)
    if found is None:
        if parts[1] is None:
            return "a bare local part, and no delivery class takes one (ask with its domain)"
        return f"{parts[1]} is not a local domain; the local domains are {_domains(policy)}"
    mailer = (recipient.mailer or "").lower()
    return (
        f"mailer {mailer or '(none)'} is not a local mailer;"
        f" the local mailers are {_expected(policy, found) or 'none'}"
    )


def _expected(policy: RelayPolicy, found: Classified) -> str:
    """The mailers the recipient's class delivers it with, with their origins."""
    expected = found.delivery_class.expected_mailers(found.address)
    known = dict(policy.provenance.mailers)
    shown = [f"{name}{_origin(origin)}" for name, origin in known.items() if name in expected]
    return ", ".join(shown + sorted(expected - known.keys()))


def _domains(policy: RelayPolicy) -> str:
    named = [f"{name}{_origin(origin)}" for name, origin in policy.provenance.domains]
    if not named:
        return "none: nothing is set or learned"
    shown = ", ".join(named[:_SHOWN_DOMAINS])
    if len(named) > _SHOWN_DOMAINS:
        shown += f" and {len(named) - _SHOWN_DOMAINS} more"
    return shown


def _origin(origin: str) -> str:
    return f" [{origin}]" if origin else ""


def _trusted_network(policy: RelayPolicy, address: IPAddress) -> str:
    for network in policy.trusted_networks:
        if network.version == address.version and address in network:
            return str(network)
    return "?"


def _pop_first_relays(policy: RelayPolicy, now: float) -> bool:
    return policy.pop_first is not PopFirst.OFF and not policy.campaign.retired(now)


def _moment(epoch: float, now: float) -> str:
    stamp = utc_text(epoch)
    return f"{stamp} ({_relative(epoch - now)})"


def _relative(seconds: float) -> str:
    whole = round(seconds)
    if whole == 0:
        return "now"
    minutes, rest = divmod(abs(whole), 60)
    hours, minutes = divmod(minutes, 60)
    parts = [f"{hours} h"] if hours else []
    if minutes:
        parts.append(f"{minutes} min")
    if rest or not parts:
        parts.append(f"{rest} s")
    span = " ".join(parts)
    return f"in {span}" if whole > 0 else f"{span} ago"
