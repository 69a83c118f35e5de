"""One contract for every whitelist store: the memory store and Redis (a real redis-server).

The tests here run in every module that imports them all and defines a
``make_subject`` fixture: ``tests/unit/test_store_contract.py`` for the
memory store, ``tests/live/test_store_contract_redis.py`` for Redis. A new
store joins with a module of its own.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import pytest

from popauth.basics.addresses import IPAddress, parse_client_address
from popauth.store import MAX_USERS_PER_ADDRESS, StoreUnavailable, UserBlocked, WhitelistStore
from popauth.store.accounts import BlockList
from popauth.store.redis import RENEWALS_PER_CALL

A = parse_client_address("192.0.2.1")
B = parse_client_address("198.51.100.7")
C = parse_client_address("2001:db8::1")
TTL = 60


@dataclass
class Subject:
    """A store under test, with the means to age it and to cut it off."""

    store: WhitelistStore
    # The block list the store checks logins against.
    blocklist: BlockList
    ttl: int
    # Let more than ``ttl`` seconds pass for every entry.
    outlive: Callable[[], None]
    # Let this many seconds pass on the store's clock.
    advance: Callable[[float], None]
    # Make the backend unreachable; False for a store that has nothing to lose.
    cut_off: Callable[[], bool]


class Factory(Protocol):
    def __call__(self, ttl: int, max_users: int = MAX_USERS_PER_ADDRESS) -> Subject: ...


@pytest.fixture
def subject(make_subject: Factory) -> Subject:
    return make_subject(TTL)


def test_grant_then_lookup(subject: Subject) -> None:
    outcome = subject.store.grant(A, "alice")
    assert not outcome.renewed
    assert outcome.evicted is None
    assert (outcome.grant.address, outcome.grant.user) == (A, "alice")
    assert outcome.grant.expires_at - outcome.grant.granted_at == pytest.approx(TTL, abs=1)
    found = subject.store.lookup(A)
    assert found is not None
    assert (found.address, found.user) == (A, "alice")


def test_lookup_of_an_unknown_client(subject: Subject) -> None:
    subject.store.grant(A, "alice")
    assert subject.store.lookup(B) is None
    assert subject.store.lookup(C) is None


def test_a_second_login_renews(subject: Subject) -> None:
    subject.store.grant(C, "bob")
    again = subject.store.grant(C, "bob")
    assert again.renewed
    renewed = subject.store.renew(C, "bob")
    assert renewed is not None
    assert renewed.user == "bob"


def test_renew_never_creates_nor_takes_over_an_entry(subject: Subject) -> None:
    assert subject.store.renew(A, "alice") is None
    assert subject.store.lookup(A) is None
    subject.store.grant(A, "alice")
    assert subject.store.renew(A, "mallory") is None
    found = subject.store.lookup(A)
    assert found is not None
    assert found.user == "alice"


def test_entries_expire(make_subject: Factory) -> None:
    subject = make_subject(2)
    subject.store.grant(A, "alice")
    assert subject.store.lookup(A) is not None
    subject.outlive()
    assert subject.store.lookup(A) is None
    assert subject.store.entries() == []
    assert subject.store.renew(A, "alice") is None


def test_revoke(subject: Subject) -> None:
    subject.store.grant(A, "alice")
    subject.store.grant(B, "bob")
    removed = subject.store.revoke(A)
    assert removed is not None
    assert (removed.address, removed.user) == (A, "alice")
    assert subject.store.lookup(A) is None
    assert subject.store.revoke(A) is None
    assert subject.store.lookup(B) is not None


def test_revoke_by_user(subject: Subject) -> None:
    subject.store.grant(A, "alice")
    subject.store.grant(C, "alice")
    subject.store.grant(B, "bob")
    removed = subject.store.revoke_user("alice")
    assert {grant.address for grant in removed} == {A, C}
    assert [grant.user for grant in subject.store.entries()] == ["bob"]
    assert subject.store.revoke_user("alice") == []


def test_revoke_by_user_matches_names_caselessly(subject: Subject) -> None:
    subject.store.grant(A, "Alice")
    subject.store.grant(C, "alice")
    subject.store.grant(B, "bob")
    removed = subject.store.revoke_user("ALICE")
    assert sorted(grant.user for grant in removed) == ["Alice", "alice"]
    assert [grant.user for grant in subject.store.entries()] == ["bob"]


def test_a_blocked_user_can_neither_log_in_nor_renew(subject: Subject) -> None:
    subject.store.grant(A, "alice")
    assert subject.blocklist.add("Alice")
    for spelling in ("alice", "ALICE", "Älice"):
        with pytest.raises(UserBlocked):
            subject.store.grant(B, spelling)
    with pytest.raises(UserBlocked):
        subject.store.renew(A, "alice")
    assert subject.store.lookup(B) is None
    # An entry from before the block (the block's revoke is the caller's
    # second step) is left as it was: neither extended nor changed.
    found = subject.store.lookup(A)
    assert found is not None
    assert found.user == "alice"
    # Other users, and logins without a user name, are not affected.
    assert not subject.store.grant(B, "bob").renewed
    subject.store.grant(C, "")
    assert subject.blocklist.remove("aLiCe")
    assert subject.store.renew(A, "alice") is not None


def test_a_batch_of_renewals_keeps_each_renewals_terms(subject: Subject) -> None:
    """renew_many answers one outcome per session, in order, each as renew would."""
    store = subject.store
    store.grant(A, "alice")
    store.grant(B, "bob")
    store.grant(C, "carol")
    assert subject.blocklist.add("Carol")
    before = {grant.address: grant.expires_at for grant in store.entries()}
    outcomes = store.renew_many(
        [
            (A, "alice"),
            (B, "mallory"),  # bob's entry: not taken over
            (parse_client_address("192.0.2.99"), "alice"),  # none: not created
            (C, "carol"),  # blocked, under any spelling
            (C, "CAROL"),
            (A, "alice"),  # twice in one batch: renewed twice
        ]
    )
    assert [(o.grant is not None, o.blocked) for o in outcomes] == [
        (True, False),
        (False, False),
        (False, False),
        (False, True),
        (False, True),
        (True, False),
    ]
    renewed = outcomes[0].grant
    assert renewed is not None
    assert (renewed.address, renewed.user) == (A, "alice")
    assert store.lookup(parse_client_address("192.0.2.99")) is None
    found = {grant.address: grant for grant in store.entries()}
    assert found[B].user == "bob"
    assert found[C].user == "carol"
    assert found[C].expires_at == pytest.approx(before[C], abs=0.01)  # blocked: left alone
    assert store.renew_many([]) == []


def test_a_batch_larger_than_one_store_call(subject: Subject) -> None:
    """More sessions than one Redis script call takes: every one answered, in order."""
    count = RENEWALS_PER_CALL * 2 + 7
    addresses = [parse_client_address(f"10.1.{n // 250}.{n % 250 + 1}") for n in range(count)]
    for number, address in enumerate(addresses):
        if number % 3:
            subject.store.grant(address, f"user{number}")
    outcomes = subject.store.renew_many(
        [(address, f"user{number}") for number, address in enumerate(addresses)]
    )
    assert len(outcomes) == count
    assert [outcome.grant is not None for outcome in outcomes] == [
        bool(number % 3) for number in range(count)
    ]
    assert all(
        outcome.grant.address == address
        for outcome, address in zip(outcomes, addresses, strict=True)
        if outcome.grant is not None
    )


RACING_ROUNDS = 200


def test_a_login_in_flight_never_outlives_a_block(subject: Subject) -> None:
    """A block is the block list's add, then the store's revoke_user; a login
    racing with it either is refused or is revoked: never left behind."""

    def login(address: IPAddress, user: str, start: threading.Barrier) -> None:
        start.wait()
        with contextlib.suppress(UserBlocked):
            subject.store.grant(address, user)

    def block(user: str, start: threading.Barrier) -> None:
        start.wait()
        subject.blocklist.add(user)
        subject.store.revoke_user(user)

    with ThreadPoolExecutor(2) as workers:
        for number in range(RACING_ROUNDS):
            start = threading.Barrier(2)
            address = parse_client_address(f"10.0.{number // 250}.{number % 250}")
            user = f"racer{number}"
            done = [workers.submit(login, address, user, start), workers.submit(block, user, start)]
            for future in done:
                future.result()
            assert subject.store.lookup(address) is None, user
    assert subject.store.entries() == []


def test_renewals_in_flight_never_outlive_a_block(subject: Subject) -> None:
    """Batches of renewals racing with a block leave no entry of the user behind."""
    addresses = [parse_client_address(f"10.2.0.{n}") for n in range(1, 41)]

    def renew(user: str, start: threading.Barrier) -> None:
        start.wait()
        for _ in range(5):
            subject.store.renew_many([(address, user) for address in addresses])

    def block(user: str, start: threading.Barrier) -> None:
        start.wait()
        subject.blocklist.add(user)
        subject.store.revoke_user(user)

    with ThreadPoolExecutor(2) as workers:
        for number in range(RACING_ROUNDS // 10):
            user = f"idler{number}"
            for address in addresses:
                subject.store.grant(address, user)
            start = threading.Barrier(2)
            done = [workers.submit(renew, user, start), workers.submit(block, user, start)]
            for future in done:
                future.result()
            assert subject.store.entries() == [], user
            outcomes = subject.store.renew_many([(addresses[0], user)])
            assert outcomes[0].blocked


def test_confirming_changes_without_replicas_to_wait_for(subject: Subject) -> None:
    subject.store.grant(A, "alice")
    subject.store.revoke(A)
    subject.store.confirm_changes()
    assert subject.store.lookup(A) is None


def test_listing_holds_every_live_entry(subject: Subject) -> None:
    for address, user in ((A, "alice"), (B, "bob"), (C, "carol")):
        subject.store.grant(address, user)
    listed = subject.store.entries()
    assert {(grant.address, grant.user) for grant in listed} == {
        (A, "alice"),
        (B, "bob"),
        (C, "carol"),
    }
    assert [grant.granted_at for grant in listed] == sorted(g.granted_at for g in listed)


def test_stats(subject: Subject) -> None:
    subject.store.grant(A, "alice")
    subject.store.grant(A, "alice")
    subject.store.grant(B, "bob")
    subject.store.revoke(B)
    stats = subject.store.stats()
    assert (stats.entries, stats.grants, stats.renewals, stats.revocations) == (1, 3, 1, 1)
    assert stats.ttl == TTL


def test_an_unreachable_store_raises_and_never_answers_wrongly(subject: Subject) -> None:
    subject.store.grant(A, "alice")
    if not subject.cut_off():
        # Nothing to lose (the memory store): it keeps answering.
        assert subject.store.lookup(A) is not None
        return
    for call in (
        lambda: subject.store.lookup(A),
        lambda: subject.store.grant(B, "bob"),
        lambda: subject.store.renew(A, "alice"),
        lambda: subject.store.revoke(A),
        lambda: subject.store.revoke_user("alice"),
        subject.store.entries,
        lambda: subject.store.spend_budget(A, 3, 60),
        lambda: subject.store.budget_use(A),
    ):
        with pytest.raises(StoreUnavailable):
            call()


# --- several users behind one address -------------------------------------


def users_at(subject: Subject, address: IPAddress) -> tuple[str, ...]:
    found = subject.store.lookup(address)
    return () if found is None else found.users


def test_every_user_who_logged_in_is_a_member_with_their_own_expiry(subject: Subject) -> None:
    store = subject.store
    first = store.grant(A, "alice")
    subject.advance(30)
    second = store.grant(A, "bob")
    assert not second.renewed
    assert second.displaced is None
    found = store.lookup(A)
    assert found is not None
    assert found.users == ("alice", "bob")
    assert found.user == "bob"  # the newest login
    alice, bob = found.grants
    assert alice.expires_at == pytest.approx(first.grant.expires_at, abs=0.01)
    assert bob.expires_at == pytest.approx(second.grant.expires_at, abs=0.01)
    assert found.expires_at == pytest.approx(bob.expires_at, abs=0.01)
    assert bob.expires_at - alice.expires_at == pytest.approx(30, abs=0.01)
    assert store.stats().entries == 1
    subject.advance(40)  # alice's login is over, bob's is not
    assert users_at(subject, A) == ("bob",)
    assert [(g.address, g.user) for g in store.entries()] == [(A, "bob")]
    assert store.renew(A, "alice") is None  # an expired membership is not brought back
    assert users_at(subject, A) == ("bob",)
    subject.advance(25)  # bob's too: the entry is gone with its last user
    assert store.lookup(A) is None
    assert store.entries() == []
    assert store.renew(A, "bob") is None


def test_a_login_renews_only_that_users_membership(subject: Subject) -> None:
    store = subject.store
    store.grant(A, "alice")
    subject.advance(10)
    store.grant(A, "bob")
    subject.advance(40)
    again = store.grant(A, "alice")
    assert again.renewed
    assert again.displaced is None
    subject.advance(30)  # bob's membership (from t=10) is over; alice's renewed one is not
    found = store.lookup(A)
    assert found is not None
    assert found.users == ("alice",)
    assert found.expires_at == pytest.approx(again.grant.expires_at, abs=0.01)


def test_renew_extends_only_that_users_membership(subject: Subject) -> None:
    store = subject.store
    store.grant(A, "alice")
    subject.advance(10)
    store.grant(A, "bob")
    subject.advance(40)
    renewed = store.renew(A, "alice")
    assert renewed is not None
    assert renewed.user == "alice"
    assert store.renew(A, "carol") is None  # a renewal never adds a user
    assert users_at(subject, A) == ("bob", "alice")  # alice's renewal is the newest write
    subject.advance(30)
    assert users_at(subject, A) == ("alice",)
    outcomes = store.renew_many([(A, "bob"), (A, "alice")])
    assert [o.grant is not None for o in outcomes] == [False, True]


def test_revoking_a_user_leaves_the_other_users_of_the_address(subject: Subject) -> None:
    store = subject.store
    store.grant(A, "alice")
    subject.advance(10)
    store.grant(A, "bob")
    store.grant(B, "bob")
    store.grant(B, "carol")
    # bob is A's newest member: A now lasts as long as alice's membership.
    removed = store.revoke_user("BOB")
    assert sorted((g.address, g.user) for g in removed) == sorted([(A, "bob"), (B, "bob")])
    found = store.lookup(A)
    assert found is not None
    assert found.users == ("alice",)
    subject.advance(TTL - 15)  # at TTL - 5: alice's membership (from 0) ends at TTL
    assert users_at(subject, A) == ("alice",)
    subject.advance(10)
    assert store.lookup(A) is None
    assert users_at(subject, B) == ("carol",)
    assert store.revoke_user("carol")[0].address == B
    assert store.lookup(B) is None
    assert store.entries() == []


def test_revoking_an_address_removes_every_user(subject: Subject) -> None:
    store = subject.store
    store.grant(A, "alice")
    store.grant(A, "bob")
    removed = store.revoke(A)
    assert removed is not None
    assert sorted(removed.users) == ["alice", "bob"]
    assert store.lookup(A) is None
    assert store.renew(A, "alice") is None
    assert store.entries() == []


def test_a_full_address_pushes_out_the_member_expiring_soonest(make_subject: Factory) -> None:
    subject = make_subject(TTL, max_users=3)
    store = subject.store
    for user in ("u1", "u2", "u3"):
        store.grant(A, user)
        subject.advance(1)
    store.renew(A, "u1")  # now u2's membership expires soonest
    subject.advance(1)
    outcome = store.grant(A, "u4")
    assert outcome.displaced is not None
    assert (outcome.displaced.address, outcome.displaced.user) == (A, "u2")
    assert users_at(subject, A) == ("u3", "u1", "u4")
    # A member's own login never pushes anyone out.
    assert store.grant(A, "u3").displaced is None
    assert sorted(users_at(subject, A)) == ["u1", "u3", "u4"]
    assert store.renew(A, "u2") is None


def test_one_user_per_address_is_the_last_login_only(make_subject: Factory) -> None:
    subject = make_subject(TTL, max_users=1)
    subject.store.grant(A, "alice")
    outcome = subject.store.grant(A, "bob")
    assert outcome.displaced is not None
    assert outcome.displaced.user == "alice"
    assert users_at(subject, A) == ("bob",)
    assert subject.store.renew(A, "alice") is None


def test_listing_holds_every_user_of_every_entry(subject: Subject) -> None:
    store = subject.store
    store.grant(A, "alice")
    subject.advance(1)
    store.grant(A, "bob")
    subject.advance(1)
    store.grant(B, "carol")
    subject.advance(1)
    store.grant(A, "")  # a login reported without a user name is a member too
    listed = [(g.address, g.user) for g in store.entries()]
    assert listed == [(A, "alice"), (A, "bob"), (B, "carol"), (A, "")]
    assert store.stats().entries == 2


def test_many_users_logging_in_at_once_from_one_address(subject: Subject) -> None:
    users = [f"user{n}" for n in range(40)]
    with ThreadPoolExecutor(4) as workers:
        list(workers.map(lambda user: subject.store.grant(A, user), users))
    assert sorted(users_at(subject, A)) == sorted(users)
    with ThreadPoolExecutor(4) as workers:
        list(workers.map(subject.store.revoke_user, users[::2]))
    assert sorted(users_at(subject, A)) == sorted(users[1::2])


# --- the relay budget ------------------------------------------------------------


def pass_window(subject: Subject, seconds: float) -> None:
    """Let a budget window of ``seconds`` end: on the store's clock, and on
    Redis's own (which expires the window's key)."""
    subject.advance(seconds)
    time.sleep(seconds)


def test_a_budget_counts_up_to_its_limit_and_not_the_refusals(subject: Subject) -> None:
    spends = [subject.store.spend_budget(A, 3, 60) for _ in range(5)]
    assert [(s.allowed, s.remaining) for s in spends] == [
        (True, 2),
        (True, 1),
        (True, 0),
        (False, 0),
        (False, 0),
    ]
    # The first refusal of the window is told apart, once.
    assert [s.first_refusal for s in spends] == [False, False, False, True, False]
    use = subject.store.budget_use(A)
    assert use.used == 3
    assert use.ends_at is not None
    # The window opened with the first recipient: spending does not move its end.
    time.sleep(0.05)
    subject.store.spend_budget(A, 3, 60)
    later = subject.store.budget_use(A).ends_at
    assert later == pytest.approx(use.ends_at, abs=0.2)


def test_reading_a_budget_counts_nothing(subject: Subject) -> None:
    assert subject.store.budget_use(A) == (0, None)
    subject.store.spend_budget(A, 2, 60)
    for _ in range(3):
        assert subject.store.budget_use(A).used == 1
    assert subject.store.spend_budget(A, 2, 60).allowed


def test_budgets_are_per_address_and_apart_from_the_whitelist(subject: Subject) -> None:
    subject.store.grant(A, "alice")
    for _ in range(2):
        subject.store.spend_budget(A, 2, 60)
    assert not subject.store.spend_budget(A, 2, 60).allowed
    assert subject.store.spend_budget(B, 2, 60) == (True, 1, False)
    assert subject.store.spend_budget(C, 2, 60) == (True, 1, False)
    # The whitelist is untouched, and lists no budget.
    assert [(g.address, g.user) for g in subject.store.entries()] == [(A, "alice")]
    assert subject.store.stats().entries == 1


def test_a_budget_window_ends_on_time_and_a_new_one_is_whole(subject: Subject) -> None:
    for _ in range(2):
        subject.store.spend_budget(A, 2, 0.4)
    assert subject.store.spend_budget(A, 2, 0.4) == (False, 0, True)
    pass_window(subject, 0.6)
    assert subject.store.budget_use(A) == (0, None)
    assert subject.store.spend_budget(A, 2, 0.4) == (True, 1, False)
    subject.store.spend_budget(A, 2, 0.4)
    # A new window warns anew.
    assert subject.store.spend_budget(A, 2, 0.4) == (False, 0, True)


def test_a_lowered_limit_holds_within_the_window(subject: Subject) -> None:
    for _ in range(3):
        subject.store.spend_budget(A, 5, 60)
    assert subject.store.spend_budget(A, 2, 60) == (False, 0, True)
    assert subject.store.spend_budget(A, 4, 60) == (True, 0, False)


def test_concurrent_spending_never_counts_past_the_limit(subject: Subject) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        spends = list(pool.map(lambda _: subject.store.spend_budget(A, 50, 60), range(160)))
    assert sum(s.allowed for s in spends) == 50
    assert sum(s.first_refusal for s in spends) == 1
    assert sorted(s.remaining for s in spends if s.allowed) == list(range(50))
    assert subject.store.budget_use(A).used == 50
