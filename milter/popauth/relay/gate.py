"""The relay gate: the pure decision joined with the store, the log and the books.

Everything the milter adapter needs, minus pymilter: the adapter turns MTA
callbacks into calls here and verdicts into milter replies, nothing more.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from cachetools import LRUCache

from popauth.basics.addresses import IPAddress, WhitelistKeying, address_text
from popauth.basics.clock import Clock, SystemClock, rfc3339
from popauth.basics.escaping import escape_text
from popauth.relay.accounting import Accounting
from popauth.relay.decision import (
    Budget,
    Client,
    Decision,
    Listing,
    PopFirst,
    PopFirstSender,
    Reason,
    RelayBudget,
    RelayPolicy,
    address_refusal,
    decide_connection,
    decide_recipient,
    decide_sender,
    decide_unsettled_recipient,
    needs_whitelist,
    sender_refusal,
)
from popauth.relay.mismatch import MailerMismatchWarner
from popauth.relay.recipients import Recipient, is_local_recipient
from popauth.store import BudgetUse, Entry, StoreUnavailable, WhitelistStore
from popauth.store.accounts import Graduates, RelayWay, UsageLedger, WeekEvent
from popauth.telemetry.metrics import Metrics

_WAYS = {Reason.SMTP_AUTH: RelayWay.SMTP_AUTH, Reason.WHITELISTED: RelayWay.POP_FIRST}
# Users this process knows to have a graduation record: their next SMTP AUTH
# relays write nothing. A record is never removed, only marked reinstated.
_KNOWN_GRADUATES = 100_000


@dataclass(frozen=True, slots=True)
class Assessment:
    """What the gate would decide for one recipient, and what it decided from.

    ``grant`` is the whitelist entry that was read, all its users (None when there is none
    or the store was not asked); ``stage`` is where the milter settles it:
    ``connect``, ``mail`` (for the whole message) or ``rcpt``.
    """

    decision: Decision
    client: Client
    policy: RelayPolicy
    grant: Entry | None
    stage: str
    # Whether the relay budget applies (a POP-first grant, a budget
    # configured), and the client's address's use of it, read, not spent
    # (None: the store could not be read).
    budget_applies: bool = False
    budget: BudgetUse | None = None


@dataclass(slots=True)
class Message:
    """What the gate remembers about the message in progress."""

    client: Client
    # decide_sender()'s verdict at MAIL FROM: the same for every recipient.
    settled: Decision | None = None
    relayed_recipients: int = 0
    # How its relayed recipients went out; the ledger is told at the end of
    # the message, so that a transaction the client abandons counts nothing.
    way: RelayWay | None = None
    # Whether the ledger counted this message's refusal for a retired POP-first.
    retired_refusal_counted: bool = False
    # The door that asked (the ``door`` of its relay_decision lines).
    door: str = "milter"


class RelayGate:
    def __init__(
        self,
        *,
        policy: RelayPolicy,
        store: WhitelistStore,
        keying: WhitelistKeying,
        ledger: UsageLedger,
        accounting: Accounting,
        metrics: Metrics,
        log: structlog.typing.FilteringBoundLogger,
        graduates: Graduates | None = None,
        clock: Clock | None = None,
        pop_first_relayed: Callable[[str], None] | None = None,
    ) -> None:
        """``graduates``: where pop_first_graduate keeps who moved on (None: it
        cannot, and no one graduates); ``clock``: the time retire_at is compared with."""
        self._policy = policy
        # Told the login user of each message relayed by POP-first (the notices); must not block.
        self._pop_first_relayed = pop_first_relayed
        self._store = store
        self._keying = keying
        self._ledger = ledger
        self._accounting = accounting
        self._metrics = metrics
        # One bound logger per door that judges through the gate.
        self._door_logs = {door: log.bind(door=door) for door in _DOORS}
        self._log = self._door_logs["milter"]
        self._mismatches = MailerMismatchWarner(self._log)
        self._graduates = graduates
        self._clock = clock or SystemClock()
        self._known_graduates: LRUCache[str, bool] = LRUCache(maxsize=_KNOWN_GRADUATES)

    @property
    def policy(self) -> RelayPolicy:
        return self._policy

    def replace_policy(self, policy: RelayPolicy) -> None:
        """Swap the policy whole (a reload); each call below reads it once."""
        self._policy = policy

    def connection(self, address: IPAddress | None) -> Decision | None:
        """A verdict for the whole SMTP connection, or None."""
        decision = decide_connection(self._policy, address)
        if decision is not None:
            self._record(decision, "connect", Client(address), None, None)
        return decision

    def message(
        self,
        address: IPAddress | None,
        auth_user: str,
        sender: str | None = None,
        door: str = "milter",
    ) -> tuple[Decision | None, Message]:
        """A verdict for every recipient of one message (or None), and its state.

        ``sender`` is MAIL FROM as the MTA gives it (None: not known); ``door``
        names the asking door in the log ("milter" or "policy").
        """
        started = time.perf_counter()
        policy = self._policy
        client, _ = self._judged_client(policy, address, auth_user, sender)
        decision = decide_sender(policy, client)
        message = Message(client, decision, door=door)
        if decision is None:
            return None, message
        if decision.reason is Reason.WHITELISTED and policy.pop_first_sender is PopFirstSender.WARN:
            self._warn_unless_owned(policy, client)
        if decision.reason is Reason.WHITELISTED and self._pop_first_relayed is not None:
            self._offer_notice(policy, client)
        way = _WAYS.get(decision.reason)
        if way is not None and (
            self._accounting is Accounting.RECIPIENTS or _budgeted(policy, decision)
        ):
            # Settled, but each RCPT must be seen to count relayed recipients
            # (in the books, or against the relay budget).
            if self._accounting is Accounting.MESSAGES:
                # The budget's RCPTs only: booked now, as without a budget.
                self._book(client, way, messages=1, recipients=0)
            return None, message
        self._record(decision, "mail", client, None, time.perf_counter() - started, door=door)
        if way is not None:
            self._book(client, way, messages=1, recipients=0)
        return decision, message

    def recipient(self, message: Message, recipient: Recipient) -> Decision:
        started = time.perf_counter()
        policy = self._policy
        client = message.client
        decision = message.settled
        relayed: bool | None = None  # is_local_recipient() once, where asked
        if decision is None:
            decision = decide_unsettled_recipient(policy, client, recipient)
        elif policy.pop_first_budget is not None and _budgeted(policy, decision):
            relayed = not is_local_recipient(recipient, policy.local_delivery)
            if relayed:
                budget = self._spend_budget(client, policy.pop_first_budget)
                # A budget left decides as none does (the decision's property
                # tests): only a refusal needs the decision again.
                if budget is not Budget.LEFT:
                    decision = decide_recipient(policy, client._replace(budget=budget), recipient)
        self._record(
            decision, "rcpt", client, recipient, time.perf_counter() - started, door=message.door
        )
        if decision.reason is Reason.POP_FIRST_RETIRED and not message.retired_refusal_counted:
            # Once per message, for popauth report --campaign.
            message.retired_refusal_counted = True
            self._ledger.record_retired_refusal(escape_text(client.login_user))
        if decision.reason is not Reason.LOCAL_RECIPIENT:
            self._mismatches.check(policy, recipient)
        way = _WAYS.get(decision.reason)
        if way is not None and self._accounting is Accounting.RECIPIENTS:
            if relayed is None:
                relayed = not is_local_recipient(recipient, policy.local_delivery)
            if relayed:
                message.relayed_recipients += 1
                message.way = way
        return decision

    def message_without_mail(self, address: IPAddress | None) -> Message:
        """RCPT TO with no MAIL FROM before it (no MTA sends that): the client
        is judged on its address alone, so it may relay only if trusted."""
        client = Client(address)
        return Message(client, decide_sender(self._policy, client))

    def message_sent(self, message: Message) -> None:
        """The end of the message's data: its relayed recipients go into the books.

        Only a message the client sent to its end counts; one aborted after
        RCPT (RSET, QUIT, a dropped connection) never reaches here.
        """
        if message.way is not None and message.relayed_recipients:
            self._book(
                message.client, message.way, messages=1, recipients=message.relayed_recipients
            )

    def count_relayed_now(self, message: Message, counted: int) -> int:
        """For a door that never sees the end of the data (Postfix's policy
        service): the relayed recipients of ``message`` beyond the ``counted``
        ones go into the books now, the message itself with the first of them.

        Returns how many are counted now. A transaction the client abandons
        after RCPT is counted too: such a door cannot tell.
        """
        new = message.relayed_recipients - counted
        if message.way is not None and new > 0:
            self._book(
                message.client, message.way, messages=1 if counted == 0 else 0, recipients=new
            )
        return message.relayed_recipients

    def assess(
        self,
        address: IPAddress,
        auth_user: str,
        recipient: Recipient,
        sender: str | None = None,
    ) -> Assessment:
        """The decision the milter would take for this recipient now, recording nothing.

        The same steps as connection(), message() and recipient() in turn,
        without the log, the metrics or the usage ledger: ``popauth explain``.
        """
        policy = self._policy
        decision = decide_connection(policy, address)
        if decision is not None:
            return Assessment(decision, Client(address), policy, None, "connect")
        client, grant = self._judged_client(policy, address, auth_user, sender)
        decision = decide_sender(policy, client)
        if (
            decision is not None
            and policy.pop_first_budget is not None
            and _budgeted(policy, decision)
        ):
            # Each relayed recipient is counted at RCPT; here only read.
            use = self._read_budget(client)
            if not is_local_recipient(recipient, policy.local_delivery):
                state = _budget_state(use, policy.pop_first_budget)
                decision = decide_recipient(policy, client._replace(budget=state), recipient)
            return Assessment(
                decision, client, policy, grant, "rcpt", budget_applies=True, budget=use
            )
        if decision is not None:
            # Counting recipients keeps the milter asking at every RCPT.
            counted = decision.reason in _WAYS and self._accounting is Accounting.RECIPIENTS
            return Assessment(decision, client, policy, grant, "rcpt" if counted else "mail")
        decision = decide_unsettled_recipient(policy, client, recipient)
        return Assessment(decision, client, policy, grant, "rcpt")

    def budget_use(self, address: IPAddress) -> tuple[RelayBudget, BudgetUse] | None:
        """The relay budget and its use by ``address`` (a whitelist key) now,
        counting nothing; None without a budget. Raises StoreUnavailable."""
        budget = self._policy.pop_first_budget
        if budget is None:
            return None
        return budget, self._store.budget_use(address)

    def _spend_budget(self, client: Client, budget: RelayBudget) -> Budget:
        """Count one relayed recipient of a POP-first client against its address's budget."""
        address = client.address
        assert address is not None  # only a listed client is granted
        try:
            spend = self._store.spend_budget(
                self._keying.key_address(address), budget.max_recipients, budget.window
            )
        except StoreUnavailable as failure:
            self._metrics.errors.labels("store_unavailable").inc()
            self._log.error(
                "whitelist_unavailable",
                client_ip=address_text(address),
                error=str(failure),
                during="relay_budget",
            )
            return Budget.UNAVAILABLE
        if spend.allowed:
            return Budget.LEFT
        if spend.first_refusal:
            # Once per address and window: the refusals after it are only
            # relay_decision lines.
            self._metrics.relay_budget_spent()
            self._log.warning(
                "relay_budget_spent",
                client_ip=address_text(address),
                user=client.login_user or None,
                users=list(client.login_users),
                max_recipients=budget.max_recipients,
                window=budget.window,
                hint="a POP-first client relayed its budget's worth of recipients; "
                "if it is no spammer, ask them to turn on SMTP AUTH",
            )
        return Budget.SPENT

    def _read_budget(self, client: Client) -> BudgetUse | None:
        """The budget of a POP-first client's address, for explain; None: unreadable."""
        assert client.address is not None
        try:
            return self._store.budget_use(self._keying.key_address(client.address))
        except StoreUnavailable:
            return None

    def address_refusal(self, address: IPAddress, grant: Entry) -> Decision | None:
        """For a door that asks by the client address alone (the socketmap): the
        refusal POP-first earns this entry now (``pop_first = "off"``, retired,
        graduated), judged without a sender, which that door never sees.

        Raises StoreUnavailable when the graduates cannot be read.
        """
        policy = self._policy
        graduated: frozenset[str] = frozenset()
        if policy.campaign.graduate and self._graduates is not None:
            graduated = self._graduates.graduated_among(grant.users)
        client = _client(
            address, "", Listing.LISTED, grant, None, now=self._clock.time(), graduated=graduated
        )
        return address_refusal(policy, client)

    def _judged_client(
        self, policy: RelayPolicy, address: IPAddress | None, auth_user: str, sender: str | None
    ) -> tuple[Client, Entry | None]:
        """The client as the decision sees it: its listing, its entry's users,
        which of them graduated (pop_first_graduate) and the time (retire_at);
        and the entry read."""
        listing, grant = self._consult(policy, address, auth_user)
        graduated: frozenset[str] = frozenset()
        if grant is not None and policy.campaign.graduate and self._graduates is not None:
            try:
                graduated = self._graduates.graduated_among(grant.users)
            except StoreUnavailable as failure:
                # Not knowing who moved on must not let them relay: fail closed.
                self._metrics.errors.labels("store_unavailable").inc()
                self._log.error("graduates_unavailable", client_ip=str(address), error=str(failure))
                listing, grant = Listing.UNAVAILABLE, None
        now = self._clock.time()
        return _client(
            address, auth_user, listing, grant, sender, now=now, graduated=graduated
        ), grant

    def _book(self, client: Client, way: RelayWay, *, messages: int, recipients: int) -> None:
        """The usage ledger, and with pop_first_graduate an SMTP AUTH relay's graduation."""
        account = _account(client)
        self._ledger.record(account, way, messages=messages, recipients=recipients)
        if way is RelayWay.SMTP_AUTH and self._policy.campaign.graduate:
            self._graduate(account)

    def _offer_notice(self, policy: RelayPolicy, client: Client) -> None:
        """A notice says POP-first ends: not to a user it does not end for
        (exempt), nor to one it no longer relays for (graduated)."""
        user = client.login_user
        if policy.campaign.exempts(user) or user in client.graduated_users:
            return
        if self._pop_first_relayed is not None:
            self._pop_first_relayed(user)

    def _graduate(self, user: str) -> None:
        if not user or self._graduates is None or user in self._known_graduates:
            return
        try:
            new = self._graduates.graduate(user, self._clock.time())
        except StoreUnavailable as failure:
            # The user relays by POP-first a while longer; the next relay tries again.
            self._log.error("graduation_not_saved", user=user, error=str(failure))
            return
        self._known_graduates[user] = True
        if new:
            self._ledger.note(WeekEvent.GRADUATED, user)
            self._log.info(
                "pop_first_graduated",
                user=user,
                hint="relayed by SMTP AUTH: POP-first relays for this user no more"
                " (undo: popauth pop-first reinstate USER)",
            )

    def _consult(
        self, policy: RelayPolicy, address: IPAddress | None, auth_user: str
    ) -> tuple[Listing, Entry | None]:
        if address is None or not needs_whitelist(policy, address, auth_user):
            return Listing.NOT_CONSULTED, None
        try:
            grant = self._store.lookup(self._keying.key_address(address))
        except StoreUnavailable as failure:
            self._metrics.errors.labels("store_unavailable").inc()
            self._log.error("whitelist_unavailable", client_ip=str(address), error=str(failure))
            return Listing.UNAVAILABLE, None
        if grant is None:
            return Listing.NOT_LISTED, None
        return Listing.LISTED, grant

    def _warn_unless_owned(self, policy: RelayPolicy, client: Client) -> None:
        """pop_first_sender = "warn": relayed, but what "own" would refuse is logged."""
        refusal = sender_refusal(policy, client)
        if refusal is not None:
            self._log.warning(
                "sender_not_owned",
                client_ip=None if client.address is None else address_text(client.address),
                sender=escape_text(client.sender or ""),
                users=list(client.login_users),
                reason=refusal.reason.value,
                hint='pop_first_sender = "own" would refuse this message',
            )

    def _record(
        self,
        decision: Decision,
        stage: str,
        client: Client,
        recipient: Recipient | None,
        seconds: float | None,
        *,
        door: str = "milter",
    ) -> None:
        verdict = decision.verdict.value
        log = self._door_logs[door]
        reason = decision.reason.value
        self._metrics.decision(verdict, reason, seconds)
        address = client.address
        # Only the fields that have a value: every one costs on each line.
        if recipient is None:
            log.info(
                "relay_decision",
                verdict=verdict,
                reason=reason,
                stage=stage,
                client_ip=None if address is None else address_text(address),
                user=client.auth_user or client.login_user or None,
            )
        else:
            log.info(
                "relay_decision",
                verdict=verdict,
                reason=reason,
                stage=stage,
                client_ip=None if address is None else address_text(address),
                user=client.auth_user or client.login_user or None,
                recipient=recipient.envelope,
                rcpt_mailer=recipient.mailer,
                rcpt_addr=recipient.resolved,
            )
        if decision.reason is Reason.WHITELISTED and _deprecated(self._policy):
            retire_at = self._policy.campaign.retire_at
            log.warning(
                "pop_first_deprecated",
                client_ip=str(client.address),
                user=client.login_user or None,
                hint="this user relays by POP-before-SMTP; ask them to turn on SMTP AUTH",
                **({} if retire_at is None else {"retire_at": rfc3339(retire_at)}),
            )


_DOORS = ("milter", "policy")


def _budgeted(policy: RelayPolicy, decision: Decision) -> bool:
    """Whether the relay budget counts this message's relayed recipients."""
    return decision.reason is Reason.WHITELISTED and policy.pop_first_budget is not None


def _budget_state(use: BudgetUse | None, budget: RelayBudget) -> Budget:
    """What spending one more recipient would find, from the budget as read."""
    if use is None:
        return Budget.UNAVAILABLE
    return Budget.LEFT if use.used < budget.max_recipients else Budget.SPENT


def _deprecated(policy: RelayPolicy) -> bool:
    """Whether a POP-first relay is logged: "warn", or a retirement date set."""
    return policy.pop_first is PopFirst.WARN or policy.campaign.retire_at is not None


def _client(
    address: IPAddress | None,
    auth_user: str,
    listing: Listing,
    grant: Entry | None,
    sender: str | None,
    *,
    now: float,
    graduated: frozenset[str],
) -> Client:
    """The decision's client, made once per message."""
    if grant is None:
        return Client(address, auth_user, listing, "", (), sender, now, graduated)
    return Client(address, auth_user, listing, grant.user, grant.users, sender, now, graduated)


def _user(client: Client) -> str:
    return client.auth_user or client.login_user


def _account(client: Client) -> str:
    """The ledger's name for the user: an 8-bit or control character in an SMTP
    AUTH name (the MTA's bytes, see popauth.doors.milter.macros) is kept as an escape, so
    that REPORT and the usage file stay printable text."""
    return escape_text(_user(client))
