"""``popauth explain``: the verdict of the real gate, and the reasons in its lines."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from popauth.basics.addresses import IPAddress, parse_client_address
from popauth.config import settings_from_mapping
from popauth.localdelivery import LearnedClass, LocalDelivery
from popauth.relay.accounting import Accounting
from popauth.relay.decision import Reason, Verdict
from popauth.relay.explain import Explainer, Question, _relative, recipient_as_the_mta_gives_it
from popauth.relay.gate import RelayGate
from popauth.relay.postfixlists import ListKind, ListPattern, PostfixList
from popauth.relay.recipients import DeliveryClass, DomainSet
from popauth.relay.replies import Replies
from popauth.store import (
    BudgetSpend,
    BudgetUse,
    Entry,
    Grant,
    GrantOutcome,
    StoreStats,
    StoreUnavailable,
    WhitelistStore,
)
from popauth.store.accounts import UsageLedger
from popauth.store.memory import MemoryStore
from popauth.telemetry.metrics import Metrics
from tests.support.clock import FakeClock
from tests.support.logs import capturing_logger

CLIENT = parse_client_address("192.0.2.10")
STRANGER = parse_client_address("198.51.100.7")
REMOTE = "friend@elsewhere.test"
LOCAL = "joe@example.test"
REJECT = "550 5.7.1 Relaying denied. Turn on SMTP AUTH."
# The fake clock's wall time at start: 2027-01-15 08:00:00 UTC.
START = "2027-01-15 08:00:00 UTC"


@dataclass
class Setup:
    clock: FakeClock
    store: WhitelistStore
    blocked: set[str] = field(default_factory=set)
    settings: dict[str, object] = field(default_factory=dict)
    provenance: LocalDelivery = field(
        default_factory=lambda: LocalDelivery(
            (
                LearnedClass(
                    DeliveryClass(
                        "local",
                        DomainSet.of(["example.test", ".example.org"]),
                        frozenset({"local"}),
                        bare_local_parts=True,
                    ),
                    "local: mixed",
                    (
                        ("example.test", "postfix mydestination"),
                        (".example.org", "configured: local_domains"),
                    ),
                    (("local", "postfix local_transport"),),
                ),
            ),
            "postfix (postconf -c /etc/postfix)",
        )
    )

    def explainer(self, accounting: Accounting = Accounting.MESSAGES) -> Explainer:
        settings = settings_from_mapping({"trusted_networks": ["10.0.0.0/8"], **self.settings})
        log, _ = capturing_logger()
        gate = RelayGate(
            policy=settings.relay.policy(self.provenance),
            store=self.store,
            keying=settings.store.keying,
            ledger=UsageLedger(max_users=10, clock=self.clock),
            accounting=accounting,
            metrics=Metrics(),
            log=log,
        )
        return Explainer(
            gate=gate,
            store=self.store,
            keying=settings.store.keying,
            blocked=self.blocked,
            replies=Replies("Turn on SMTP AUTH.", "POP first is retired."),
            clock=self.clock,
        )

    def lines(self, address: IPAddress, recipient: str, **options: str) -> list[str]:
        return self.explainer().explain(Question(address, recipient, **options))


@pytest.fixture
def setup() -> Setup:
    clock = FakeClock(wall=1_800_000_000.0)
    return Setup(clock, MemoryStore(ttl=900, max_entries=3, clock=clock))


def field_of(lines: list[str], label: str) -> str:
    found = [line.removeprefix(f"{label}: ") for line in lines if line.startswith(f"{label}: ")]
    assert len(found) == 1, lines
    return found[0]


def test_a_stranger_to_a_remote_recipient_was_never_granted(setup: Setup) -> None:
    lines = setup.lines(CLIENT, REMOTE)
    assert field_of(lines, "verdict") == "reject (relay_denied), at RCPT TO, for this recipient"
    assert field_of(lines, "reply") == REJECT
    assert field_of(lines, "whitelist") == (
        "192.0.2.10 has no entry: never granted since popauth started, as far as it remembers"
        " (the last 10000 addresses that logged in or lost their entry)"
    )
    assert field_of(lines, "recipient") == (
        "friend@elsewhere.test is relayed: elsewhere.test is not a local domain; the local"
        " domains are example.test [postfix mydestination],"
        " .example.org [configured: local_domains]"
    )


def test_a_stranger_may_send_to_a_local_recipient(setup: Setup) -> None:
    lines = setup.lines(STRANGER, LOCAL)
    assert field_of(lines, "verdict").startswith("accept (local_recipient), at RCPT TO")
    assert field_of(lines, "reply").startswith("none from popauth")
    assert field_of(lines, "recipient") == (
        "joe@example.test is local: domain example.test [postfix mydestination]"
        " (delivery class local), mailer local [postfix local_transport] (the mailer is"
        " assumed: --mailer names the {rcpt_mailer} the MTA uses)"
    )


def test_a_subdomain_names_the_parent_entry_that_makes_it_local(setup: Setup) -> None:
    recipient = field_of(setup.lines(STRANGER, "a@mx.example.org"), "recipient")
    assert "domain .example.org [configured: local_domains]" in recipient


def test_a_local_domain_with_a_foreign_mailer_is_relayed(setup: Setup) -> None:
    lines = setup.lines(STRANGER, LOCAL, mailer="smtp")
    assert field_of(lines, "verdict").startswith("reject (relay_denied)")
    assert field_of(lines, "recipient") == (
        "joe@example.test is relayed: mailer smtp is not a local mailer; the local mailers"
        " are local [postfix local_transport]"
    )


def test_a_routing_address_in_a_local_domain_is_relayed(setup: Setup) -> None:
    recipient = field_of(setup.lines(STRANGER, "x%elsewhere.test@example.test"), "recipient")
    assert "is relayed: not a plain mailbox" in recipient


def test_a_whitelisted_client_relays_with_its_entry_shown(setup: Setup) -> None:
    # Without a relay budget, a whitelisted message is settled at MAIL.
    setup.settings["pop_first_max_recipients"] = ""
    setup.store.grant(CLIENT, "joe")
    setup.clock.advance(60)
    lines = setup.lines(CLIENT, REMOTE, user="joe", sender="joe@example.test")
    assert field_of(lines, "verdict") == (
        "accept (whitelisted), at MAIL FROM, for every recipient of the message"
    )
    assert field_of(lines, "whitelist") == (
        f"192.0.2.10: joe logged in at {START} (1 min ago); the entry expires at"
        " 2027-01-15 08:15:00 UTC (in 14 min)"
    )
    assert field_of(lines, "user") == "joe is not blocked"
    assert field_of(lines, "recipient").endswith("(the verdict does not depend on it)")
    assert field_of(lines, "sender") == (
        "joe@example.test belongs to a user of the entry (pop_first_sender = 'warn')"
    )


def test_counting_recipients_settles_a_whitelisted_client_at_rcpt(setup: Setup) -> None:
    setup.store.grant(CLIENT, "joe")
    facts = setup.explainer(Accounting.RECIPIENTS).facts(Question(CLIENT, REMOTE))
    assert facts.assessment.decision.reason is Reason.WHITELISTED
    assert facts.assessment.stage == "rcpt"


def test_an_expired_entry_says_when(setup: Setup) -> None:
    setup.store.grant(CLIENT, "joe")
    setup.clock.advance(1000)
    lines = setup.lines(CLIENT, REMOTE)
    assert field_of(lines, "verdict").startswith("reject (relay_denied)")
    assert field_of(lines, "whitelist") == (
        "192.0.2.10 has no entry: it expired at 2027-01-15 08:15:00 UTC (1 min 40 s ago);"
        f" it was joe's, from a login at {START} (16 min 40 s ago)"
    )


def test_a_revoked_entry_says_when_and_how(setup: Setup) -> None:
    setup.store.grant(CLIENT, "joe")
    setup.clock.advance(5)
    setup.store.revoke(CLIENT)
    whitelist = field_of(setup.lines(CLIENT, REMOTE), "whitelist")
    assert whitelist == (
        "192.0.2.10 has no entry: a REVOKE of the address removed it at"
        f" 2027-01-15 08:00:05 UTC (now); it was joe's, from a login at {START} (5 s ago)"
    )


def test_a_blocked_user_is_named_with_the_way_back(setup: Setup) -> None:
    setup.store.grant(CLIENT, "joe")
    setup.blocked.add("joe")
    setup.store.revoke_user("joe")
    lines = setup.lines(CLIENT, REMOTE)
    assert "a REVOKEUSER or BLOCK of its user removed it" in field_of(lines, "whitelist")
    assert field_of(lines, "user") == (
        "joe is blocked: their POP/IMAP logins are refused and whitelist nothing"
        " (popauth unblock joe)"
    )


def test_the_expected_user_is_checked_against_the_entry(setup: Setup) -> None:
    setup.store.grant(CLIENT, "ann")
    users = [line for line in setup.lines(CLIENT, REMOTE, user="joe") if line.startswith("user:")]
    assert users == ["user: joe is not blocked", "user: the entry is ann's, not joe's"]


def test_an_entry_pushed_out_of_a_full_whitelist(setup: Setup) -> None:
    for last in range(1, 5):  # max_entries is 3: the fourth login pushes out the first
        setup.store.grant(parse_client_address(f"192.0.2.{last}"), f"user{last}")
    whitelist = field_of(setup.lines(parse_client_address("192.0.2.1"), REMOTE), "whitelist")
    assert "it was pushed out at 2027-01-15 08:00:00 UTC (now) to make room" in whitelist


def test_smtp_auth_settles_it_without_the_whitelist(setup: Setup) -> None:
    setup.blocked.add("joe")
    lines = setup.lines(STRANGER, REMOTE, auth_user="joe")
    assert field_of(lines, "verdict").startswith("accept (smtp_auth), at MAIL FROM")
    assert field_of(lines, "whitelist") == (
        "not consulted: the client authenticated with SMTP AUTH as joe"
    )
    assert field_of(lines, "user").startswith("joe is blocked, but a block refuses POP/IMAP")


def test_a_trusted_network_is_named(setup: Setup) -> None:
    lines = setup.lines(parse_client_address("10.1.2.3"), REMOTE)
    assert field_of(lines, "verdict").startswith("accept (trusted_network), at CONNECT")
    assert field_of(lines, "whitelist") == (
        "not consulted: 10.1.2.3 is in trusted_networks (10.0.0.0/8)"
    )


def test_pop_first_off_refuses_a_whitelisted_client_with_its_own_reply(setup: Setup) -> None:
    setup.settings["pop_first"] = "off"
    setup.store.grant(CLIENT, "joe")
    lines = setup.lines(CLIENT, REMOTE)
    assert field_of(lines, "verdict").startswith("reject (pop_first_retired)")
    assert field_of(lines, "reply") == "550 5.7.1 Relaying denied. POP first is retired."
    assert field_of(lines, "whitelist").endswith(
        'pop_first = "off": a POP/IMAP login no longer lets anyone relay'
    )


def test_an_ipv6_client_is_explained_by_its_prefix(setup: Setup) -> None:
    setup.settings["ipv6_prefix"] = 64
    address = parse_client_address("IPv6:2001:db8::5")
    setup.store.grant(parse_client_address("2001:db8::"), "joe")
    whitelist = field_of(setup.lines(address, REMOTE), "whitelist")
    assert whitelist.startswith("2001:db8::/64 (2001:db8::5): joe logged in at")


class UnreachableStore(WhitelistStore):
    """A store that cannot answer, and remembers nothing (as Redis does)."""

    def __init__(self, reachable: bool) -> None:
        self.reachable = reachable

    def lookup(self, address: IPAddress) -> Entry | None:
        if not self.reachable:
            raise StoreUnavailable("connection refused")
        return None

    def grant(self, address: IPAddress, user: str) -> GrantOutcome:
        raise NotImplementedError

    def renew(self, address: IPAddress, user: str) -> Grant | None:
        raise NotImplementedError

    def revoke(self, address: IPAddress) -> Entry | None:
        raise NotImplementedError

    def revoke_user(self, user: str) -> list[Grant]:
        raise NotImplementedError

    def entries(self) -> list[Grant]:
        return []

    def stats(self) -> StoreStats:
        raise NotImplementedError

    def spend_budget(self, address: IPAddress, limit: int, window: float) -> BudgetSpend:
        raise NotImplementedError

    def budget_use(self, address: IPAddress) -> BudgetUse:
        if not self.reachable:
            raise StoreUnavailable("connection refused")
        return BudgetUse(0, None)


def test_an_unreachable_store_gives_the_temporary_failure(setup: Setup) -> None:
    setup.store = UnreachableStore(reachable=False)
    lines = setup.lines(CLIENT, REMOTE)
    assert field_of(lines, "verdict").startswith("tempfail (whitelist_unavailable)")
    assert field_of(lines, "reply") == "451 4.3.0 Relay check unavailable, try again later"
    assert field_of(lines, "whitelist").startswith("the store cannot be read now")


def test_a_store_without_memory_of_ends_says_it_cannot_tell(setup: Setup) -> None:
    setup.store = UnreachableStore(reachable=True)
    assert field_of(setup.lines(CLIENT, REMOTE), "whitelist") == (
        "192.0.2.10 has no entry: never granted, expired or revoked: this store keeps no"
        " record of ended entries, so popauth cannot tell which"
    )


def test_the_verdict_is_the_milters_for_every_case(setup: Setup) -> None:
    # The same gate decides a real message: explain must agree with it.
    setup.store.grant(CLIENT, "joe")
    explainer = setup.explainer()
    for address, recipient, auth in [
        (CLIENT, REMOTE, ""),
        (STRANGER, REMOTE, ""),
        (STRANGER, LOCAL, ""),
        (STRANGER, REMOTE, "joe"),
    ]:
        facts = explainer.facts(Question(address, recipient, auth_user=auth))
        gate = explainer._gate
        decision, message = gate.message(address, auth)
        if decision is None:
            decision = gate.recipient(message, facts.recipient)
        assert facts.assessment.decision == decision, (address, recipient, auth)


def test_no_domain_and_no_mailer_assumption_for_a_remote_recipient(setup: Setup) -> None:
    policy = setup.explainer()._gate.policy
    recipient, assumed = recipient_as_the_mta_gives_it(Question(CLIENT, REMOTE), policy)
    assert (recipient.mailer, assumed) == (None, True)
    recipient, assumed = recipient_as_the_mta_gives_it(Question(CLIENT, "postmaster"), policy)
    assert (recipient.mailer, assumed) == ("local", True)
    given = Question(CLIENT, LOCAL, mailer="lmtp")
    assert recipient_as_the_mta_gives_it(given, policy)[0].mailer == "lmtp"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "now"),
        (0.4, "now"),
        (5, "in 5 s"),
        (-60, "1 min ago"),
        (-3725, "1 h 2 min 5 s ago"),
        (7200, "in 2 h"),
    ],
)
def test_relative_times(seconds: float, text: str) -> None:
    assert _relative(seconds) == text


def test_the_verdict_word_is_the_decisions() -> None:
    assert {verdict.value for verdict in Verdict} == {"accept", "reject", "tempfail"}


def test_an_excluded_domain_of_a_learned_class_is_relayed(setup: Setup) -> None:
    """relay_domains = !customer.backup.test, backup.test: the exclusion is explained."""
    relay = PostfixList(
        (ListPattern(False, "customer.backup.test"), ListPattern(True, "backup.test")),
        ListKind.DOMAIN,
        parent_style=True,
    )
    setup.provenance = LocalDelivery(
        (
            LearnedClass(
                DeliveryClass("relay", relay, frozenset({"relay"})),
                "relay: relay_domains (a name matches its subdomains too)",
                (
                    ("!customer.backup.test", "postfix relay_domains"),
                    ("backup.test", "postfix relay_domains"),
                ),
                (("relay", "postfix relay_transport (for relay_domains)"),),
            ),
        ),
        "postfix (config_directory /etc/postfix)",
    )
    excluded = field_of(setup.lines(STRANGER, "anyone@customer.backup.test"), "recipient")
    assert excluded.startswith("anyone@customer.backup.test is relayed: customer.backup.test")
    local = field_of(setup.lines(STRANGER, "anyone@sub.backup.test"), "recipient")
    assert local.startswith(
        "anyone@sub.backup.test is local: domain backup.test [postfix relay_domains]"
        " (delivery class relay), mailer relay"
    )


def test_every_user_of_the_entry_is_shown_with_their_own_expiry(setup: Setup) -> None:
    setup.store.grant(CLIENT, "joe")
    setup.clock.advance(60)
    setup.store.grant(CLIENT, "ann")
    lines = setup.lines(CLIENT, REMOTE, user="max")
    assert field_of(lines, "whitelist") == (
        f"192.0.2.10: 2 users logged in: joe (logged in at {START} (1 min ago),"
        " until 2027-01-15 08:15:00 UTC (in 14 min)), ann (logged in at"
        " 2027-01-15 08:01:00 UTC (now), until 2027-01-15 08:16:00 UTC (in 15 min));"
        " the entry expires at 2027-01-15 08:16:00 UTC (in 15 min), with its last user"
    )
    assert "user: the entry is joe's and ann's, not max's" in lines
    setup.store.revoke_user("ann")
    assert field_of(setup.lines(CLIENT, REMOTE), "whitelist").startswith(
        f"192.0.2.10: joe logged in at {START}"
    )


class BudgetUnreadable(MemoryStore):
    """A store whose whitelist answers but whose relay budgets cannot be read."""

    def budget_use(self, address: IPAddress) -> BudgetUse:
        raise StoreUnavailable("connection refused")


def test_an_unreadable_budget_gives_the_temporary_failure(setup: Setup) -> None:
    setup.store = BudgetUnreadable(ttl=900, max_entries=3, clock=setup.clock)
    setup.store.grant(CLIENT, "joe")
    lines = setup.lines(CLIENT, REMOTE)
    assert field_of(lines, "verdict") == (
        "tempfail (whitelist_unavailable), at RCPT TO, for this recipient"
    )
    assert field_of(lines, "reply") == "451 4.3.0 Relay check unavailable, try again later"
    assert field_of(lines, "budget").startswith("the store cannot be read now")
    # A local recipient needs no budget.
    assert field_of(setup.lines(CLIENT, LOCAL), "verdict").startswith("accept (whitelisted)")


def test_a_spent_budget_is_explained_with_its_end(setup: Setup) -> None:
    setup.settings["pop_first_max_recipients"] = 2
    setup.store.grant(CLIENT, "joe")
    for _ in range(2):
        setup.store.spend_budget(CLIENT, 2, 3600)
    lines = setup.lines(CLIENT, REMOTE)
    assert field_of(lines, "verdict") == "tempfail (budget_spent), at RCPT TO, for this recipient"
    assert field_of(lines, "reply") == (
        "451 4.7.1 Too many recipients for a POP/IMAP login: try again later, or turn on SMTP AUTH."
    )
    assert field_of(lines, "budget") == (
        "spent (2 per 1 h): relayed recipients get 451 4.7.1 until 2027-01-15 09:00:00 UTC (in 1 h)"
    )
