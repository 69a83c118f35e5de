"""The pymilter adapter, driven in-process with pymilter's own test context."""

from __future__ import annotations

import socket

import Milter
import pytest

# Renamed so that pytest does not take it for a test class.
from Milter.testctx import TestCtx as MilterContext

from popauth.basics.addresses import IPAddress, WhitelistKeying, parse_client_address
from popauth.config import settings_from_mapping
from popauth.doors.milter.adapter import RelayMilter, Replies, client_address_of
from popauth.localdelivery import LocalDelivery
from popauth.relay.accounting import Accounting
from popauth.relay.gate import RelayGate
from popauth.store import Entry
from popauth.store.accounts import UsageLedger
from popauth.store.memory import MemoryStore
from popauth.telemetry.metrics import Metrics
from tests.support.clock import FakeClock
from tests.support.logs import capturing_logger


class BrokenStore(MemoryStore):
    """A store with a bug: not a StoreUnavailable, just an exception."""

    def lookup(self, address: IPAddress) -> Entry | None:
        raise RuntimeError("bug in the store")


def make(
    store: MemoryStore,
    trusted: tuple[str, ...] = (),
    accounting: Accounting = Accounting.MESSAGES,
    ledger: UsageLedger | None = None,
) -> tuple[RelayMilter, MilterContext, Metrics]:
    settings = settings_from_mapping(
        {
            "trusted_networks": list(trusted),
            "local_domains": ["local.test"],
            # Without a relay budget, a whitelisted message is settled at MAIL.
            "pop_first_max_recipients": "",
        }
    )
    metrics = Metrics()
    log, _ = capturing_logger()
    gate = RelayGate(
        policy=settings.relay.policy(LocalDelivery.configured(["local.test"], ["local"])),
        store=store,
        keying=WhitelistKeying(),
        ledger=ledger or UsageLedger(max_users=10, clock=FakeClock()),
        accounting=accounting,
        metrics=metrics,
        log=log,
    )
    milter = RelayMilter(gate, Replies("Turn on SMTP AUTH.", "Retired."), metrics, log)
    context = MilterContext()
    context._stage = -1  # every macro readable
    milter._setctx(context)
    return milter, context, metrics


def test_a_failing_callback_answers_tempfail_never_continue() -> None:
    milter, context, metrics = make(BrokenStore(ttl=900, max_entries=10, clock=FakeClock()))
    assert milter.connect("client", socket.AF_INET, ("198.51.100.7", 4321)) == Milter.CONTINUE
    assert milter.envfrom("<sender@example.org>") == Milter.TEMPFAIL
    assert context._reply == ("451", "4.3.0", "Relay check failed, try again later")
    errors = metrics.registry.get_sample_value("popauth_errors_total", {"kind": "milter_callback"})
    assert errors == 1


def test_a_message_counts_at_its_end_and_an_aborted_one_not_at_all() -> None:
    store = MemoryStore(ttl=900, max_entries=10, clock=FakeClock())
    store.grant(parse_client_address("198.51.100.7"), "alice")
    ledger = UsageLedger(max_users=10, clock=FakeClock())
    milter, context, _ = make(store, accounting=Accounting.RECIPIENTS, ledger=ledger)
    milter.connect("client", socket.AF_INET, ("198.51.100.7", 4321))
    context._setsymval("{rcpt_mailer}", "smtp")
    context._setsymval("{rcpt_addr}", "x@remote.example")
    assert milter.envfrom("<alice@local.test>") == Milter.CONTINUE
    assert milter.envrcpt("<x@remote.example>") == Milter.CONTINUE
    assert milter.abort() == Milter.CONTINUE  # RSET after RCPT
    assert ledger.get("alice") is None
    assert milter.envfrom("<alice@local.test>") == Milter.CONTINUE
    assert milter.envrcpt("<x@remote.example>") == Milter.CONTINUE
    assert milter.envrcpt("<x@remote.example>") == Milter.CONTINUE
    assert milter.eom() == Milter.CONTINUE
    milter.abort()  # Postfix ends every transaction with ABORT, sent or not
    usage = ledger.get("alice")
    assert usage is not None
    assert (usage.pop_messages, usage.pop_recipients) == (1, 2)


def test_replies_and_early_verdicts() -> None:
    store = MemoryStore(ttl=900, max_entries=10, clock=FakeClock())
    store.grant(parse_client_address("198.51.100.8"), "alice")
    milter, context, _ = make(store)
    milter.connect("client", socket.AF_INET, ("198.51.100.7", 4321))
    assert milter.envfrom("<sender@example.org>") == Milter.CONTINUE
    context._setsymval("{rcpt_mailer}", "smtp")
    context._setsymval("{rcpt_addr}", "x@remote.example")
    assert milter.envrcpt("<x@remote.example>") == Milter.REJECT
    assert context._reply == ("550", "5.7.1", "Relaying denied. Turn on SMTP AUTH.")
    context._setsymval("{rcpt_mailer}", "local")
    context._setsymval("{rcpt_addr}", "y@local.test")
    assert milter.envrcpt("<y@local.test>") == Milter.CONTINUE  # never ACCEPT at RCPT
    whitelisted, _, _ = make(store)
    whitelisted.connect("client", socket.AF_INET6, ("::ffff:198.51.100.8", 4321, 0, 0))
    assert whitelisted.envfrom("<sender@example.org>") == Milter.ACCEPT


def test_client_address_forms() -> None:
    assert client_address_of(("192.0.2.1", 25)) == parse_client_address("192.0.2.1")
    assert client_address_of(("::ffff:192.0.2.1", 25, 0, 0)) == parse_client_address("192.0.2.1")
    assert client_address_of("/run/some.sock") is None
    assert client_address_of(None) is None
    assert client_address_of(("not-an-ip", 25)) is None


def test_8bit_macros_are_decided_on_their_bytes() -> None:
    # What popauth.doors.milter.macros makes of bytes that are not UTF-8: surrogate escapes.
    store = MemoryStore(ttl=900, max_entries=10, clock=FakeClock())
    milter, context, _ = make(store)
    milter.connect("client", socket.AF_INET, ("198.51.100.7", 4321))
    assert milter.envfrom("<sender@example.org>") == Milter.CONTINUE
    context._setsymval("{rcpt_mailer}", "local")
    context._setsymval("{rcpt_addr}", b"j\xf6rg@local.test".decode("utf-8", "surrogateescape"))
    assert milter.envrcpt(b"<j\xf6rg@local.test>".decode("utf-8", "surrogateescape")) == (
        Milter.CONTINUE
    )
    context._setsymval("{rcpt_mailer}", "smtp")
    context._setsymval("{rcpt_addr}", b"j\xf6rg@remote.example".decode("utf-8", "surrogateescape"))
    assert milter.envrcpt("<x@remote.example>") == Milter.REJECT
    context._setsymval("{auth_authen}", b"j\xf6rg".decode("utf-8", "surrogateescape"))
    assert milter.envfrom("<sender@example.org>") == Milter.ACCEPT


def test_unusable_client_addresses_are_no_address_at_all() -> None:
    # Issue 11, defect 11: the milter door refuses them like the others.
    for text in ("0.0.0.0", "255.255.255.255", "224.0.0.1", "::", "ff02::1"):
        assert client_address_of((text, 25)) is None, text
    assert client_address_of(("fe80::1%eth0", 25, 0, 2)) == parse_client_address("fe80::1")


OFFERED = [0, Milter.P_NR_CONN | Milter.P_NR_MAIL | Milter.P_NR_RCPT, 0, 0]


def test_connect_owes_no_answer_without_trusted_networks() -> None:
    milter, _, _ = make(MemoryStore(ttl=900, max_entries=10, clock=FakeClock()))
    options = list(OFFERED)
    assert milter.negotiate(options) == Milter.CONTINUE
    # CONNECT cannot decide anything; MAIL and RCPT can and are answered.
    assert options[1] & Milter.P_NR_CONN
    assert not options[1] & (Milter.P_NR_MAIL | Milter.P_NR_RCPT)
    assert milter.connect("client", socket.AF_INET, ("198.51.100.7", 4321)) == Milter.NOREPLY


def test_connect_is_answered_where_trusted_networks_can_accept() -> None:
    store = MemoryStore(ttl=900, max_entries=10, clock=FakeClock())
    milter, _, _ = make(store, trusted=("192.0.2.0/24",))
    options = list(OFFERED)
    milter.negotiate(options)
    assert not options[1] & Milter.P_NR_CONN
    assert milter.connect("client", socket.AF_INET, ("192.0.2.7", 4321)) == Milter.ACCEPT


def test_a_failure_at_a_connect_owing_no_answer_leaves_a_stranger(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = MemoryStore(ttl=900, max_entries=10, clock=FakeClock())
    store.grant(parse_client_address("198.51.100.7"), "alice")
    milter, context, metrics = make(store)
    milter.negotiate(list(OFFERED))

    def broken(hostaddr: object) -> IPAddress | None:
        raise RuntimeError("bug")

    monkeypatch.setattr("popauth.doors.milter.adapter.client_address_of", broken)
    # Any answer here would be taken for the answer to MAIL: none escapes.
    assert milter.connect("client", socket.AF_INET, ("198.51.100.7", 4321)) == Milter.NOREPLY
    errors = metrics.registry.get_sample_value("popauth_errors_total", {"kind": "milter_callback"})
    assert errors == 1
    # The client is not known, so not whitelisted: it may not relay.
    assert milter.envfrom("<sender@example.org>") == Milter.CONTINUE
    context._setsymval("{rcpt_mailer}", "smtp")
    context._setsymval("{rcpt_addr}", "x@remote.example")
    assert milter.envrcpt("<x@remote.example>") == Milter.REJECT
