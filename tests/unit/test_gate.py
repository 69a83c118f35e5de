"""The gate: decisions joined with the store, the usage ledger, metrics and logs."""

from __future__ import annotations

from structlog.testing import CapturingLogger

from popauth.basics.addresses import IPAddress, WhitelistKeying, parse_client_address
from popauth.config import settings_from_mapping
from popauth.localdelivery import LocalDelivery
from popauth.relay.accounting import Accounting
from popauth.relay.decision import Reason, Verdict
from popauth.relay.gate import RelayGate
from popauth.relay.recipients import Recipient
from popauth.store import BudgetSpend, StoreUnavailable, WhitelistStore
from popauth.store.accounts import UsageLedger
from popauth.store.memory import MemoryStore
from popauth.telemetry.metrics import Metrics
from tests.support.clock import FakeClock
from tests.support.logs import capturing_logger, events

CLIENT = parse_client_address("198.51.100.7")
REMOTE = Recipient("<x@remote.example>", "smtp", "x@remote.example")
LOCAL = Recipient("<y@local.test>", "local", "y@local.test")


def make(
    accounting: Accounting,
    pop_first: str = "on",
    pop_first_sender: str = "warn",
    *,
    max_recipients: int | str = "",
    store: WhitelistStore | None = None,
    clock: FakeClock | None = None,
) -> tuple[RelayGate, UsageLedger, Metrics, CapturingLogger]:
    """A gate for CLIENT, whitelisted for alice; without a relay budget unless asked."""
    settings = settings_from_mapping(
        {
            "trusted_networks": [],
            "local_domains": ["local.test"],
            "pop_first": pop_first,
            "pop_first_sender": pop_first_sender,
            "pop_first_max_recipients": max_recipients,
            "pop_first_budget_window": 60,
        }
    )
    clock = clock or FakeClock()
    store = store or MemoryStore(ttl=900, max_entries=10, clock=clock)
    store.grant(CLIENT, "alice")
    ledger = UsageLedger(max_users=10, clock=clock)
    metrics = Metrics()
    log, sink = capturing_logger()
    gate = RelayGate(
        policy=settings.relay.policy(LocalDelivery.configured(["local.test"], ["local"])),
        store=store,
        keying=WhitelistKeying(),
        ledger=ledger,
        accounting=accounting,
        metrics=metrics,
        log=log,
    )
    return gate, ledger, metrics, sink


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_messages_mode_accepts_at_mail_and_counts_the_message() -> None:
    gate, ledger, metrics, _ = make(Accounting.MESSAGES)
    decision, _ = gate.message(CLIENT, "")
    assert decision is not None
    assert decision.reason is Reason.WHITELISTED
    usage = ledger.get("alice")
    assert usage is not None
    assert (usage.pop_messages, usage.pop_recipients) == (1, 0)
    assert sample(metrics, "popauth_decisions_total", verdict="accept", reason="whitelisted") == 1
    assert sample(metrics, "popauth_decision_seconds_count") == 1


def test_recipients_mode_watches_every_rcpt_and_counts_relayed_ones() -> None:
    gate, ledger, _, _ = make(Accounting.RECIPIENTS)
    decision, message = gate.message(CLIENT, "")
    assert decision is None  # settled, but the RCPTs must be seen
    for recipient in (REMOTE, LOCAL, REMOTE):
        assert gate.recipient(message, recipient).verdict is Verdict.ACCEPT
    gate.message_sent(message)
    _, second = gate.message(CLIENT, "")
    gate.recipient(second, REMOTE)
    gate.message_sent(second)
    gate.message(parse_client_address("203.0.113.9"), "bob")  # authenticated, no RCPT
    _, third = gate.message(parse_client_address("203.0.113.9"), "bob")
    gate.recipient(third, REMOTE)
    gate.message_sent(third)
    alice = ledger.get("alice")
    assert alice is not None
    assert (alice.pop_messages, alice.pop_recipients) == (2, 3)
    bob = ledger.get("bob")
    assert bob is not None
    assert (bob.auth_messages, bob.auth_recipients, bob.pop_messages) == (1, 1, 0)


def test_recipients_mode_counts_a_message_only_once_it_is_sent() -> None:
    gate, ledger, _, _ = make(Accounting.RECIPIENTS)
    _, abandoned = gate.message(CLIENT, "")
    gate.recipient(abandoned, REMOTE)
    gate.recipient(abandoned, REMOTE)
    # Judged and relayed at RCPT, then RSET or QUIT: no end of data, no count.
    assert ledger.get("alice") is None
    _, local_only = gate.message(CLIENT, "")
    gate.recipient(local_only, LOCAL)
    gate.message_sent(local_only)
    assert ledger.get("alice") is None  # nothing relayed, nothing counted
    _, sent = gate.message(CLIENT, "")
    gate.recipient(sent, REMOTE)
    gate.message_sent(sent)
    alice = ledger.get("alice")
    assert alice is not None
    assert (alice.pop_messages, alice.pop_recipients) == (1, 1)


def test_warn_mode_relays_and_logs_a_deprecation() -> None:
    gate, _, _, logged = make(Accounting.MESSAGES, pop_first="warn")
    decision, _ = gate.message(CLIENT, "")
    assert decision is not None
    assert decision.verdict is Verdict.ACCEPT
    assert "pop_first_deprecated" in events(logged)


def test_off_mode_refuses_with_its_own_reason() -> None:
    gate, ledger, metrics, _ = make(Accounting.MESSAGES, pop_first="off")
    decision, message = gate.message(CLIENT, "")
    assert decision is None
    assert gate.recipient(message, REMOTE).reason is Reason.POP_FIRST_RETIRED
    assert gate.recipient(message, LOCAL).reason is Reason.LOCAL_RECIPIENT
    assert ledger.pop_first_users() == []
    assert (
        sample(metrics, "popauth_decisions_total", verdict="reject", reason="pop_first_retired")
        == 1
    )


def test_an_8bit_smtp_auth_name_is_booked_printable() -> None:
    # The adapter hands over the MTA's bytes as surrogate escapes (popauth.doors.milter.macros).
    gate, ledger, _, _ = make(Accounting.MESSAGES)
    latin1_name = b"j\xf6rg\x1b[2J".decode("utf-8", "surrogateescape")
    decision, _ = gate.message(parse_client_address("203.0.113.9"), latin1_name)
    assert decision is not None and decision.reason is Reason.SMTP_AUTH
    usage = ledger.get("j\\xf6rg\\x1b[2J")
    assert usage is not None
    assert ledger.get(latin1_name) is None


def test_a_local_domain_with_a_foreign_mailer_is_warned_once_per_pair() -> None:
    gate, _, _, sink = make(Accounting.MESSAGES)
    stranger = parse_client_address("203.0.113.9")
    for _ in range(5):
        _, message = gate.message(stranger, "")
        lmtp = Recipient("<a@local.test>", "lmtp", "a@local.test")
        assert gate.recipient(message, lmtp).reason is Reason.RELAY_DENIED
        assert gate.recipient(message, LOCAL).reason is Reason.LOCAL_RECIPIENT
        assert gate.recipient(message, REMOTE).reason is Reason.RELAY_DENIED
    warned = [
        c.kwargs for c in sink.calls if c.kwargs.get("event") == "local_domain_with_foreign_mailer"
    ]
    assert [(w["rcpt_mailer"], w["domain"]) for w in warned] == [("lmtp", "local.test")]


def test_a_replaced_policy_applies_to_the_next_recipient() -> None:
    gate, _, _, _ = make(Accounting.MESSAGES)
    stranger = parse_client_address("203.0.113.9")
    lmtp = Recipient("<a@local.test>", "lmtp", "a@local.test")
    _, message = gate.message(stranger, "")
    assert gate.recipient(message, lmtp).reason is Reason.RELAY_DENIED
    settings = settings_from_mapping({"trusted_networks": []})
    gate.replace_policy(
        settings.relay.policy(LocalDelivery.configured(["local.test"], ["local", "lmtp"]))
    )
    assert gate.recipient(message, lmtp).reason is Reason.LOCAL_RECIPIENT


def test_own_relays_the_entrys_users_own_senders_only() -> None:
    gate, _, _, logged = make(Accounting.MESSAGES, pop_first_sender="own")
    decision, _ = gate.message(CLIENT, "", "<alice@local.test>")
    assert decision is not None
    assert decision.reason is Reason.WHITELISTED
    for sender, reason in (
        ("<bob@local.test>", Reason.SENDER_NOT_OWNED),
        ("<alice@remote.example>", Reason.SENDER_NOT_OWNED),
        ("<>", Reason.NULL_SENDER),
    ):
        settled, message = gate.message(CLIENT, "", sender)
        assert settled is None  # every RCPT is judged: local ones are accepted
        refused = gate.recipient(message, REMOTE)
        assert (refused.verdict, refused.reason) == (Verdict.REJECT, reason)
        assert gate.recipient(message, LOCAL).reason is Reason.LOCAL_RECIPIENT
    # SMTP AUTH is never asked for its sender.
    decision, _ = gate.message(CLIENT, "bob", "<>")
    assert decision is not None
    assert decision.reason is Reason.SMTP_AUTH
    assert "sender_not_owned" not in events(logged)


def test_warn_relays_any_sender_and_logs_what_own_would_refuse() -> None:
    gate, _, _, logged = make(Accounting.MESSAGES, pop_first_sender="warn")
    assert gate.message(CLIENT, "", "<alice@local.test>")[0] is not None
    assert "sender_not_owned" not in events(logged)
    decision, _ = gate.message(CLIENT, "", "<mallory@local.test>")
    assert decision is not None
    assert decision.reason is Reason.WHITELISTED
    (warning,) = [c.kwargs for c in logged.calls if c.kwargs.get("event") == "sender_not_owned"]
    assert (warning["sender"], warning["users"], warning["client_ip"]) == (
        "<mallory@local.test>",
        ["alice"],
        "198.51.100.7",
    )


# --- the relay budget ----------------------------------------------------------


def budget_used(gate: RelayGate) -> int:
    found = gate.budget_use(CLIENT)
    assert found is not None
    return found[1].used


def test_the_budget_counts_relayed_recipients_of_pop_first_clients_only() -> None:
    clock = FakeClock()
    gate, _, metrics, logged = make(Accounting.MESSAGES, max_recipients=3, clock=clock)
    decision, message = gate.message(CLIENT, "")
    assert decision is None  # settled, but each relayed RCPT is counted
    verdicts = [gate.recipient(message, r).reason for r in (REMOTE, LOCAL, REMOTE, LOCAL, REMOTE)]
    assert verdicts == [Reason.WHITELISTED] * 5
    assert budget_used(gate) == 3  # the local recipients count nothing
    spent = gate.recipient(message, REMOTE)
    assert (spent.verdict, spent.reason) == (Verdict.TEMPFAIL, Reason.BUDGET_SPENT)
    # Local recipients still go through; every relayed one is refused, uncounted.
    assert gate.recipient(message, LOCAL).verdict is Verdict.ACCEPT
    assert gate.recipient(message, REMOTE).reason is Reason.BUDGET_SPENT
    assert budget_used(gate) == 3
    # One warning per address and window, counted once; every refusal is a decision.
    assert events(logged).count("relay_budget_spent") == 1
    assert sample(metrics, "popauth_relay_budgets_spent_total") == 1
    assert (
        sample(metrics, "popauth_decisions_total", verdict="tempfail", reason="budget_spent") == 2
    )
    # SMTP AUTH is never counted, nor refused by the budget.
    other = parse_client_address("203.0.113.9")
    decision, _ = gate.message(other, "bob")
    assert decision is not None and decision.reason is Reason.SMTP_AUTH
    found = gate.budget_use(other)
    assert found is not None and found[1].used == 0
    # After the window, a full budget again, and a new warning once it is spent.
    clock.advance(61)
    _, message = gate.message(CLIENT, "")
    assert [gate.recipient(message, REMOTE).verdict for _ in range(4)] == [
        Verdict.ACCEPT,
        Verdict.ACCEPT,
        Verdict.ACCEPT,
        Verdict.TEMPFAIL,
    ]
    assert events(logged).count("relay_budget_spent") == 2


def test_a_refused_sender_spends_no_budget() -> None:
    gate, _, _, _ = make(Accounting.MESSAGES, pop_first_sender="own", max_recipients=3)
    _, message = gate.message(CLIENT, "", "mallory@evil.test")
    assert gate.recipient(message, REMOTE).reason is Reason.SENDER_NOT_OWNED
    assert budget_used(gate) == 0
    _, message = gate.message(CLIENT, "", "alice@local.test")
    assert gate.recipient(message, REMOTE).reason is Reason.WHITELISTED
    assert budget_used(gate) == 1


class SpendingFails(MemoryStore):
    def spend_budget(self, address: IPAddress, limit: int, window: float) -> BudgetSpend:
        raise StoreUnavailable("connection refused")


def test_a_store_that_cannot_count_fails_closed() -> None:
    clock = FakeClock()
    store = SpendingFails(ttl=900, max_entries=10, clock=clock)
    gate, _, metrics, logged = make(Accounting.MESSAGES, max_recipients=3, store=store, clock=clock)
    _, message = gate.message(CLIENT, "")
    refused = gate.recipient(message, REMOTE)
    assert (refused.verdict, refused.reason) == (Verdict.TEMPFAIL, Reason.WHITELIST_UNAVAILABLE)
    assert gate.recipient(message, LOCAL).verdict is Verdict.ACCEPT
    assert "whitelist_unavailable" in events(logged)
    assert sample(metrics, "popauth_errors_total", kind="store_unavailable") == 1


def test_recipients_accounting_counts_only_what_the_budget_let_through() -> None:
    gate, ledger, _, _ = make(Accounting.RECIPIENTS, max_recipients=2)
    _, message = gate.message(CLIENT, "")
    for _ in range(4):
        gate.recipient(message, REMOTE)
    gate.message_sent(message)
    alice = ledger.get("alice")
    assert alice is not None
    assert (alice.pop_messages, alice.pop_recipients) == (1, 2)


def test_assess_reads_the_budget_and_spends_none() -> None:
    gate, _, _, _ = make(Accounting.MESSAGES, max_recipients=1)
    for _ in range(3):
        assessment = gate.assess(CLIENT, "", REMOTE)
        assert assessment.decision.reason is Reason.WHITELISTED
        assert assessment.budget_applies and assessment.budget is not None
    assert budget_used(gate) == 0
    _, message = gate.message(CLIENT, "")
    gate.recipient(message, REMOTE)
    assessment = gate.assess(CLIENT, "", REMOTE)
    assert (assessment.decision.reason, assessment.stage) == (Reason.BUDGET_SPENT, "rcpt")
    assert gate.assess(CLIENT, "", LOCAL).decision.verdict is Verdict.ACCEPT
    assert budget_used(gate) == 1


def test_without_a_budget_nothing_is_counted() -> None:
    gate, _, _, _ = make(Accounting.MESSAGES)
    assert gate.budget_use(CLIENT) is None
    decision, _ = gate.message(CLIENT, "")
    assert decision is not None and decision.reason is Reason.WHITELISTED


def test_with_a_budget_the_books_count_messages_at_mail_as_without_one() -> None:
    gate, ledger, _, _ = make(Accounting.MESSAGES, max_recipients=10)
    _, abandoned = gate.message(CLIENT, "")
    gate.recipient(abandoned, REMOTE)  # then RSET or QUIT: counted, as at MAIL before
    _, sent = gate.message(CLIENT, "")
    for recipient in (REMOTE, LOCAL, REMOTE):
        gate.recipient(sent, recipient)
    gate.message_sent(sent)
    alice = ledger.get("alice")
    assert alice is not None
    assert (alice.pop_messages, alice.pop_recipients) == (2, 0)
