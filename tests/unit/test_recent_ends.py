"""The memory store's bounded memory of how recent entries ended (for explain)."""

from __future__ import annotations

from popauth.basics.addresses import parse_client_address
from popauth.store import EndReason
from popauth.store.memory import REMEMBERED_ENDS, MemoryStore
from tests.support.clock import FakeClock

A = parse_client_address("192.0.2.1")
B = parse_client_address("192.0.2.2")
C = parse_client_address("192.0.2.3")


def make(max_entries: int = 10, remembered: int = REMEMBERED_ENDS) -> tuple[MemoryStore, FakeClock]:
    clock = FakeClock()
    store = MemoryStore(ttl=900, max_entries=max_entries, clock=clock, remembered_ends=remembered)
    return store, clock


def test_a_live_or_never_granted_address_has_no_end() -> None:
    store, _ = make()
    assert store.recent_end(A) is None
    store.grant(A, "joe")
    assert store.recent_end(A) is None


def test_an_expired_entry_ends_at_its_expiry() -> None:
    store, clock = make()
    granted = store.grant(A, "joe").grant
    clock.advance(900)
    ended = store.recent_end(A)
    assert ended is not None
    assert ended.reason is EndReason.EXPIRED
    assert ended.ended_at == granted.expires_at
    assert ended.grant == granted


def test_a_renewal_moves_the_expiry_it_reports() -> None:
    store, clock = make()
    store.grant(A, "joe")
    clock.advance(600)
    renewed = store.renew(A, "joe")
    assert renewed is not None
    clock.advance(900)
    ended = store.recent_end(A)
    assert ended is not None and ended.ended_at == renewed.expires_at


def test_an_entry_pushed_out_of_a_full_whitelist_says_so() -> None:
    store, clock = make(max_entries=2)
    store.grant(A, "joe")
    store.grant(B, "ann")
    clock.advance(10)
    outcome = store.grant(C, "zed")
    assert outcome.evicted is not None and outcome.evicted.address == A
    ended = store.recent_end(A)
    assert ended is not None and ended.reason is EndReason.EVICTED
    assert ended.ended_at == clock.time()
    assert store.recent_end(B) is None


def test_revoked_entries_say_when() -> None:
    store, clock = make()
    store.grant(A, "joe")
    store.grant(B, "ann")
    clock.advance(10)
    store.revoke(A)
    clock.advance(5)
    store.revoke_user("ann")
    ended_a, ended_b = store.recent_end(A), store.recent_end(B)
    assert ended_a is not None and ended_b is not None
    assert (ended_a.reason, ended_b.reason) == (EndReason.REVOKED, EndReason.REVOKED_WITH_USER)
    assert ended_b.ended_at - ended_a.ended_at == 5
    assert ended_a.grant.user == "joe"


def test_a_new_login_replaces_the_remembered_end() -> None:
    store, _ = make()
    store.grant(A, "joe")
    store.revoke(A)
    store.grant(A, "ann")
    assert store.recent_end(A) is None


def test_the_memory_is_bounded_and_forgets_the_oldest() -> None:
    store, _ = make(remembered=2)
    assert store.ends_remembered == 2
    for address in (A, B, C):
        store.grant(address, "joe")
        store.revoke(address)
    assert store.recent_end(A) is None  # forgotten
    assert store.recent_end(B) is not None
    assert store.recent_end(C) is not None


def test_lookups_leave_the_memory_alone() -> None:
    # The milter's per-message path is a lookup: it must not write the memory,
    # so a looked-up address is forgotten in login order like any other.
    store, clock = make(remembered=2)
    store.grant(A, "joe")
    store.grant(B, "ann")
    for _ in range(3):
        store.lookup(A)
    store.grant(C, "zed")
    clock.advance(900)
    assert store.recent_end(A) is None
    ended = store.recent_end(B)
    assert ended is not None and ended.reason is EndReason.EXPIRED


def test_restored_entries_are_remembered() -> None:
    store, clock = make()
    other, _ = make()
    grant = other.grant(A, "joe").grant
    assert store.restore([grant]) == 1
    clock.advance(900)
    ended = store.recent_end(A)
    assert ended is not None and ended.reason is EndReason.EXPIRED
