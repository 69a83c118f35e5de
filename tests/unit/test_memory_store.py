from __future__ import annotations

import ipaddress
import threading
from collections.abc import Callable

import pytest

from popauth.basics.addresses import parse_client_address
from popauth.store import memory
from popauth.store.budgets import RelayBudgets
from popauth.store.memory import MemoryStore
from popauth.store.pacing import CHUNK
from tests.support.clock import FakeClock

A = parse_client_address("192.0.2.1")
B = parse_client_address("192.0.2.2")
C = parse_client_address("192.0.2.3")
V6 = parse_client_address("::c000:201")  # same integer as 192.0.2.1


def make(ttl: int = 900, max_entries: int = 10) -> tuple[MemoryStore, FakeClock]:
    clock = FakeClock()
    return MemoryStore(ttl=ttl, max_entries=max_entries, clock=clock), clock


def test_grant_lookup_and_expiry() -> None:
    store, clock = make(ttl=900)
    outcome = store.grant(A, "alice")
    assert not outcome.renewed
    assert outcome.grant.user == "alice"
    assert outcome.grant.granted_at == clock.time()
    assert outcome.grant.expires_at == clock.time() + 900
    clock.advance(899)
    grant = store.lookup(A)
    assert grant is not None
    assert grant.user == "alice"
    clock.advance(1)
    assert store.lookup(A) is None
    assert store.stats().entries == 0


def test_a_new_login_of_the_same_user_renews_and_another_user_joins() -> None:
    store, clock = make(ttl=900)
    store.grant(A, "alice")
    clock.advance(800)
    assert store.grant(A, "alice").renewed
    assert not store.grant(A, "alice2").renewed
    clock.advance(800)
    grant = store.lookup(A)
    assert grant is not None
    assert grant.users == ("alice", "alice2")
    assert grant.expires_at == clock.time() + 100
    stats = store.stats()
    assert (stats.grants, stats.renewals, stats.entries) == (3, 1, 1)


def test_ipv4_and_ipv6_keys_do_not_collide() -> None:
    store, _ = make()
    store.grant(A, "alice")
    assert store.lookup(V6) is None
    store.grant(V6, "bob")
    assert {(str(g.address), g.user) for g in store.entries()} == {
        ("192.0.2.1", "alice"),
        ("::c000:201", "bob"),
    }


def test_revoke() -> None:
    store, _ = make()
    store.grant(A, "alice")
    removed = store.revoke(A)
    assert removed is not None
    assert removed.user == "alice"
    assert store.lookup(A) is None
    assert store.revoke(A) is None
    assert store.stats().revocations == 1


def test_full_store_drops_expired_then_the_least_recently_used() -> None:
    store, clock = make(ttl=100, max_entries=2)
    store.grant(A, "a")
    clock.advance(50)
    store.grant(B, "b")
    clock.advance(60)  # A has expired
    outcome = store.grant(C, "c")
    assert outcome.evicted is None
    assert store.lookup(A) is None
    store.lookup(B)  # a lookup that relays is a use: B is now younger than C
    outcome = store.grant(A, "a")
    assert outcome.evicted is not None
    assert (outcome.evicted.address, outcome.evicted.user) == (C, "c")
    assert store.lookup(B) is not None
    assert store.stats().evictions == 1
    assert store.stats().entries == 2
    clock.advance(5)
    store.grant(A, "a")  # a renewal makes A the youngest
    assert store.grant(C, "c").evicted.address == B  # type: ignore[union-attr]


def test_a_lookup_that_misses_uses_nothing() -> None:
    store, _ = make(ttl=100, max_entries=2)
    store.grant(A, "a")
    store.grant(B, "b")
    assert store.lookup(C) is None
    assert store.grant(C, "c").evicted.address == A  # type: ignore[union-attr]


def test_a_listing_is_not_a_use() -> None:
    store, clock = make(ttl=100, max_entries=3)
    store.grant(A, "a")
    clock.advance(1)
    store.grant(B, "b")
    clock.advance(1)
    store.grant(C, "c")
    store.lookup(A)  # A is the most recently used ...
    assert [g.address for g in store.entries()] == [A, B, C]
    assert store.stats().entries == 3
    # ... and stays so: listing and counting read no entry as a use.
    assert store.grant(V6, "d").evicted.address == B  # type: ignore[union-attr]


def test_expiry_is_kept_per_entry() -> None:
    store, clock = make(ttl=900)
    store.grant(A, "alice")
    clock.advance(100)
    grant = store.lookup(A)
    assert grant is not None
    assert grant.expires_at == clock.time() + 800
    assert grant.granted_at == clock.time() - 100


def test_entries_oldest_first_and_stats() -> None:
    store, clock = make()
    store.grant(B, "b")
    clock.advance(1)
    store.grant(A, "a")
    assert [g.address for g in store.entries()] == [B, A]
    store.lookup(A)
    store.lookup(C)
    stats = store.stats()
    assert (stats.lookups, stats.hits, stats.entries, stats.max_entries) == (2, 1, 2, 10)


def test_concurrent_use_is_safe() -> None:
    store, _ = make(max_entries=500)
    addresses = [parse_client_address(f"10.0.{i // 256}.{i % 256}") for i in range(1000)]

    def work(offset: int) -> None:
        for i in range(offset, len(addresses), 4):
            store.grant(addresses[i], "u")
            store.lookup(addresses[(i * 7) % len(addresses)])
            store.revoke(addresses[(i * 3) % len(addresses)])

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = store.stats()
    assert stats.grants == 1000
    assert stats.entries <= 500
    assert len(store.entries()) == stats.entries


def test_renew_extends_only_a_live_entry_of_the_same_user() -> None:
    store, clock = make(ttl=900)
    store.grant(A, "alice")
    clock.advance(800)
    renewed = store.renew(A, "alice")
    assert renewed is not None
    assert (renewed.user, renewed.granted_at, renewed.expires_at) == (
        "alice",
        clock.time(),
        clock.time() + 900,
    )
    clock.advance(800)  # 1600 s after the login: alive only thanks to the renewal
    grant = store.lookup(A)
    assert grant is not None
    assert grant.expires_at == clock.time() + 100
    # Another user's session never extends alice's entry, and changes nothing.
    assert store.renew(A, "bob") is None
    clock.advance(100)
    assert store.lookup(A) is None
    assert store.stats().grants == 1


def test_renew_never_creates_an_entry() -> None:
    store, clock = make(ttl=900)
    assert store.renew(A, "alice") is None
    store.grant(B, "alice")
    clock.advance(900)  # expired
    assert store.renew(B, "alice") is None
    assert store.lookup(A) is None
    assert store.lookup(B) is None
    assert store.entries() == []


def test_revoked_entries_stay_revoked_until_the_next_login() -> None:
    store, clock = make(ttl=900)
    store.grant(A, "alice")
    store.grant(B, "alice")
    store.revoke(A)
    store.revoke_user("alice")
    for _ in range(3):
        clock.advance(300)
        assert store.renew(A, "alice") is None
        assert store.renew(B, "alice") is None
    assert store.lookup(A) is None
    store.grant(A, "alice")  # a real login brings it back
    assert store.renew(A, "alice") is not None


def test_renewed_entry_moves_to_the_young_end_of_the_eviction_order() -> None:
    store, clock = make(ttl=900, max_entries=2)
    store.grant(A, "alice")
    clock.advance(1)
    store.grant(B, "bob")
    clock.advance(1)
    store.renew(A, "alice")
    outcome = store.grant(C, "carol")  # full: the oldest is now bob's
    assert outcome.evicted is not None
    assert outcome.evicted.address == B
    assert [g.address for g in store.entries()] == [A, C]


# --- walks over the whole whitelist let others in between chunks -------------

ADDRESSES = [parse_client_address(f"10.1.{n // 256}.{n % 256}") for n in range(CHUNK * 3 + 5)]


def filled(count: int = len(ADDRESSES)) -> tuple[MemoryStore, FakeClock]:
    store, clock = make(ttl=900, max_entries=len(ADDRESSES) + 10)
    for address in ADDRESSES[:count]:
        store.grant(address, "filler")
        clock.advance(0.001)
    return store, clock


def between_chunks(monkeypatch: pytest.MonkeyPatch, action: Callable[[int], None]) -> None:
    """Run ``action(pause number)`` where a walk lets other threads in."""
    pauses = iter(range(1_000_000))
    monkeypatch.setattr(memory, "let_others_run", lambda: action(next(pauses)))


def test_a_listing_releases_the_lock_between_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    store, _ = filled()
    answered: list[bool] = []

    def lookup_from_another_thread(_: int) -> None:
        thread = threading.Thread(target=lambda: answered.append(store.lookup(A) is None))
        thread.start()
        thread.join(5)
        assert not thread.is_alive(), "a lookup waited for the whole listing"

    between_chunks(monkeypatch, lookup_from_another_thread)
    assert len(store.entries()) == len(ADDRESSES)
    # Every chunk of the walk and of making the grants was followed by a pause.
    assert len(answered) >= 2 * (len(ADDRESSES) // CHUNK)


def test_a_listing_shows_an_entry_renewed_meanwhile_once_with_its_new_login(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store, clock = filled()
    oldest, newest = ADDRESSES[0], ADDRESSES[-1]
    newcomer = parse_client_address("203.0.113.9")

    def logins(pause: int) -> None:
        if pause == 0:  # the first chunk is listed; renew one behind and one ahead
            clock.advance(1)
            store.grant(oldest, "filler")
            store.grant(newest, "filler")
            store.grant(newcomer, "late")

    between_chunks(monkeypatch, logins)
    listed = store.entries()
    addresses = [grant.address for grant in listed]
    assert len(addresses) == len(set(addresses)) == len(ADDRESSES) + 1
    assert addresses[-3:] == [oldest, newest, newcomer]
    assert [grant.granted_at for grant in listed] == sorted(g.granted_at for g in listed)


def test_revoking_a_user_removes_a_login_of_theirs_made_meanwhile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store, _ = filled()
    store.grant(A, "alice")
    store.grant(B, "bob")

    def login_of_alice(pause: int) -> None:
        if pause == 0:
            store.grant(C, "ALICE")

    between_chunks(monkeypatch, login_of_alice)
    removed = store.revoke_user("alice")
    assert {grant.address for grant in removed} == {A, C}
    assert store.lookup(A) is None
    assert store.lookup(C) is None
    assert store.lookup(B) is not None
    assert store.stats().entries == len(ADDRESSES) + 1


def test_expired_entries_leave_the_cache_and_the_listing_alike() -> None:
    store, clock = filled(CHUNK + 3)
    clock.advance(900 - 0.0015)  # all but the newest have expired
    assert [grant.address for grant in store.entries()] == [ADDRESSES[CHUNK + 2]]
    assert store.stats().entries == 1
    store.grant(A, "a")
    assert [grant.address for grant in store.entries()] == [ADDRESSES[CHUNK + 2], A]


def test_a_restored_entry_of_a_user_blocked_since_is_dropped() -> None:
    clock = FakeClock()
    saved = MemoryStore(ttl=900, max_entries=10, clock=clock)
    saved.grant(A, "alice")
    saved.grant(B, "bob")
    store = MemoryStore(
        ttl=900, max_entries=10, clock=clock, is_blocked=lambda user: user == "alice"
    )
    assert store.restore(saved.entries()) == 1
    assert store.lookup(A) is None
    assert store.lookup(B) is not None


def test_a_full_store_evicts_an_address_with_all_its_users() -> None:
    store, clock = make(max_entries=2)
    store.grant(A, "alice")
    store.grant(A, "bob")
    clock.advance(1)
    store.grant(V6, "carol")
    outcome = store.grant(parse_client_address("198.51.100.9"), "dave")
    assert outcome.evicted is not None
    assert (outcome.evicted.address, outcome.evicted.users) == (A, ("alice", "bob"))
    assert store.lookup(A) is None
    assert [g.user for g in store.entries()] == ["carol", "dave"]
    assert store.stats().entries == 2


def test_the_recent_end_of_an_entry_of_several_users() -> None:
    store, clock = make(ttl=900)
    store.grant(A, "alice")
    clock.advance(100)
    store.grant(A, "bob")
    store.revoke_user("bob")  # alice's membership remains: no end yet
    assert store.recent_end(A) is None
    clock.advance(850)  # alice's ended at 900
    ended = store.recent_end(A)
    assert ended is not None
    assert (ended.grant.user, ended.reason.value) == ("alice", "expired")
    assert ended.ended_at == pytest.approx(clock.time() - 50)
    store.grant(A, "carol")
    store.grant(A, "dave")
    store.revoke_user("carol")
    store.revoke_user("dave")
    ended = store.recent_end(A)
    assert ended is not None
    assert (ended.grant.user, ended.reason.value) == ("dave", "revoked_with_user")


def test_budget_windows_of_addresses_that_are_gone_do_not_pile_up() -> None:
    clock = FakeClock()
    budgets = RelayBudgets(clock=clock, max_windows=100)
    for n in range(50):
        budgets.spend(ipaddress.ip_address(f"192.0.2.{n}"), 3, 60)
    assert len(budgets) == 50
    clock.advance(61)
    assert len(budgets) == 0


def test_budget_windows_are_bounded_the_one_ending_soonest_makes_room() -> None:
    clock = FakeClock()
    budgets = RelayBudgets(clock=clock, max_windows=3)
    first, *others = (ipaddress.ip_address(f"192.0.2.{n}") for n in range(4))
    budgets.spend(first, 1, 60)
    for address in others:
        clock.advance(1)
        budgets.spend(address, 1, 60)
    assert len(budgets) == 3
    assert budgets.use(first) == (0, None)
    assert budgets.use(others[-1]).used == 1


def test_a_window_longer_than_the_ones_after_it_does_not_hold_them_up() -> None:
    clock = FakeClock()
    budgets = RelayBudgets(clock=clock, max_windows=10)
    long, short = ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("192.0.2.2")
    budgets.spend(long, 1, 600)  # before a reload shortened the window
    budgets.spend(short, 1, 60)
    clock.advance(61)
    assert budgets.use(short) == (0, None)
    assert budgets.spend(short, 1, 60).allowed
    assert not budgets.spend(long, 1, 60).allowed
