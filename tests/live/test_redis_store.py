"""RedisStore against a real redis-server: semantics, timeouts and recovery."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.ports import free_port
from harness.redis import RedisInstance
from popauth.basics.addresses import parse_client_address
from popauth.basics.clock import SystemClock
from popauth.store import StoreUnavailable, UserBlocked
from popauth.store.accounts import Graduation, RedisBlockList, RedisGraduates
from popauth.store.redis import RedisStore, connect, glob_escaped
from tests.support.clock import FakeClock

pytestmark = pytest.mark.live

A = parse_client_address("192.0.2.1")
B = parse_client_address("2001:db8::")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisInstance]:
    with RedisInstance(root=tmp_path / "redis", port=free_port()) as server:
        yield server


def make_store(server: RedisInstance, ttl: int = 900, prefix: str = "popauth:") -> RedisStore:
    return RedisStore(
        client=connect(server.url, 0.5), ttl=ttl, key_prefix=prefix, clock=SystemClock()
    )


def test_grant_renew_lookup_revoke_list(redis_server: RedisInstance) -> None:
    store = make_store(redis_server)
    first = store.grant(A, "alice")
    assert not first.renewed
    assert store.grant(A, "alice").renewed
    store.grant(B, "bob with spaces")
    grant = store.lookup(A)
    assert grant is not None
    assert (grant.user, grant.expires_at - grant.granted_at) == ("alice", 900)
    assert {(g.address, g.user) for g in store.entries()} == {(A, "alice"), (B, "bob with spaces")}
    removed = store.revoke(A)
    assert removed is not None
    assert removed.user == "alice"
    assert store.lookup(A) is None
    assert store.revoke(A) is None
    stats = store.stats()
    assert (stats.entries, stats.grants, stats.renewals, stats.revocations) == (1, 3, 1, 1)


def test_two_hosts_share_entries_and_prefixes_separate_sites(redis_server: RedisInstance) -> None:
    host_a, host_b = make_store(redis_server), make_store(redis_server)
    other_site = make_store(redis_server, prefix="othersite:")
    host_a.grant(A, "alice")
    assert host_b.lookup(A) is not None
    assert other_site.lookup(A) is None
    host_b.revoke(A)
    assert host_a.lookup(A) is None


def test_redis_expires_entries(redis_server: RedisInstance) -> None:
    store = make_store(redis_server, ttl=1)
    store.grant(A, "alice")
    deadline = time.monotonic() + 5
    while store.lookup(A) is not None:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_foreign_values_never_whitelist(redis_server: RedisInstance) -> None:
    store = make_store(redis_server)
    store._client.set("popauth:192.0.2.1", b"\xff garbage")
    assert store.lookup(A) is None


def test_outage_fails_fast_and_recovers(redis_server: RedisInstance) -> None:
    store = make_store(redis_server)
    store.grant(A, "alice")
    redis_server.stop()
    for operation in (lambda: store.lookup(A), lambda: store.grant(A, "a"), store.entries):
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            operation()
        assert time.monotonic() - started < 2
    redis_server.start()
    # No restart of the store: the next call reconnects.
    assert store.lookup(A) is None  # the outage lost Redis's unsaved data
    store.grant(A, "alice")
    assert store.lookup(A) is not None


def test_slow_redis_times_out_instead_of_blocking(redis_server: RedisInstance) -> None:
    store = make_store(redis_server)
    store.grant(A, "alice")
    sleeper = socket.create_connection(("127.0.0.1", redis_server.port))
    sleeper.sendall(b"DEBUG SLEEP 2\r\n")  # Redis stalls every client for 2 s
    try:
        time.sleep(0.1)  # let the stall begin; the timeout below is what matters
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.lookup(A)
        assert time.monotonic() - started < 1.5
    finally:
        sleeper.recv(64)
        sleeper.close()
    assert store.lookup(A) is not None


def test_unix_socket_url(redis_server: RedisInstance) -> None:
    over_tcp = make_store(redis_server)
    over_unix = RedisStore(
        client=connect(redis_server.unix_url, 0.5),
        ttl=900,
        key_prefix="popauth:",
        clock=SystemClock(),
    )
    assert over_unix.ping()
    over_unix.grant(A, "alice")
    grant = over_tcp.lookup(A)
    assert grant is not None
    assert grant.user == "alice"


def test_renew_extends_only_a_live_entry_of_the_same_user(redis_server: RedisInstance) -> None:
    store = make_store(redis_server, ttl=900)
    store.grant(A, "alice with spaces")
    key = "popauth:192.0.2.1"
    store._client.expire(key, 5)  # as if the login was long ago
    renewed = store.renew(A, "alice with spaces")
    assert renewed is not None
    assert renewed.expires_at - renewed.granted_at == 900
    assert 895 <= store._client.ttl(key) <= 900
    grant = store.lookup(A)
    assert grant is not None
    assert grant.user == "alice with spaces"
    assert grant.expires_at == pytest.approx(renewed.expires_at, abs=0.001)
    # Someone else's session changes nothing.
    store._client.expire(key, 5)
    assert store.renew(A, "alice") is None
    assert store.renew(A, "alice with") is None
    assert store._client.ttl(key) <= 5
    grant = store.lookup(A)
    assert grant is not None
    assert grant.user == "alice with spaces"


def test_renew_never_creates_and_revokes_win(redis_server: RedisInstance) -> None:
    store = make_store(redis_server)
    assert store.renew(A, "alice") is None
    store.grant(A, "alice")
    store.grant(B, "alice")
    store.revoke(A)
    store.revoke_user("alice")
    assert store.renew(A, "alice") is None
    assert store.renew(B, "alice") is None
    assert store._client.keys("popauth:*") == []
    store.grant(A, "alice")  # the next real login
    assert store.renew(A, "alice") is not None


def test_renew_leaves_foreign_values_alone(redis_server: RedisInstance) -> None:
    store = make_store(redis_server)
    store._client.set("popauth:192.0.2.1", b"\xff garbage", ex=50)
    assert store.renew(A, "garbage") is None
    assert store._client.get("popauth:192.0.2.1") == b"\xff garbage"
    assert store._client.ttl("popauth:192.0.2.1") <= 50


def test_renew_fails_closed_when_redis_is_down(redis_server: RedisInstance) -> None:
    store = make_store(redis_server)
    store.grant(A, "alice")
    redis_server.stop()
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        store.renew(A, "alice")
    assert time.monotonic() - started < 2
    redis_server.start()
    assert store.renew(A, "alice") is None  # the restart lost the entry; none is made up


@pytest.mark.parametrize("prefix", ["mail[1]:", "site*:", "a?b:", "back\\slash:", "[^x]-:"])
def test_glob_characters_in_the_prefix_are_literal(
    redis_server: RedisInstance, prefix: str
) -> None:
    """SCAN MATCH takes a glob: unescaped, "mail[1]:*" finds "mail1:" keys and
    never its own, and a block or revoke by user then revokes nothing."""
    store = make_store(redis_server, prefix=prefix)
    # A site whose keys the unescaped pattern would match instead.
    neighbour = make_store(redis_server, prefix="mail1:")
    store.grant(A, "alice")
    store.grant(B, "alice")
    neighbour.grant(A, "alice")
    assert {(grant.address, grant.user) for grant in store.entries()} == {
        (A, "alice"),
        (B, "alice"),
    }
    assert store.stats().entries == 2
    assert {grant.address for grant in store.revoke_user("alice")} == {A, B}
    assert store.lookup(A) is None
    assert store.lookup(B) is None
    assert neighbour.lookup(A) is not None


def test_glob_escaping() -> None:
    assert glob_escaped("mail[1]:") == "mail\\[1\\]:"
    assert glob_escaped("a*b?c\\d") == "a\\*b\\?c\\\\d"
    assert glob_escaped("popauth:") == "popauth:"


def test_a_block_list_member_from_before_caseless_names_still_counts(
    redis_server: RedisInstance,
) -> None:
    store = make_store(redis_server)
    blocks = RedisBlockList(store.client, store.blocklist_key)
    store.client.sadd(store.blocklist_key, "Alice")  # as an earlier popauth wrote it
    with pytest.raises(UserBlocked):
        store.grant(A, "Alice")
    assert "Alice" in blocks
    assert blocks.add("ALICE")  # now kept caseless, for every spelling
    with pytest.raises(UserBlocked):
        store.grant(A, "alice")
    assert blocks.remove("Alice")
    assert blocks.users() == []
    assert not store.grant(A, "alice").renewed


def test_the_keys_own_expiry_is_its_last_members(redis_server: RedisInstance) -> None:
    clock = FakeClock(wall=time.time())
    store = RedisStore(
        client=connect(redis_server.url, 0.5), ttl=900, key_prefix="popauth:", clock=clock
    )
    key = "popauth:192.0.2.1"
    store.grant(A, "alice")
    clock.advance(300)
    store.grant(A, "bob")
    assert store._client.type(key) == b"hash"
    assert 899_000 < store._client.pttl(key) <= 900_000
    store.revoke_user("bob")  # now alice's membership, 600 s left, is the last
    assert 599_000 < store._client.pttl(key) <= 600_000
    store.revoke_user("alice")
    assert store._client.exists(key) == 0


def test_entries_of_the_one_user_format_are_read_and_converted(
    redis_server: RedisInstance,
) -> None:
    """An entry as earlier releases wrote it, "granted expires user", still counts."""
    store = make_store(redis_server)
    key = "popauth:192.0.2.1"
    now = time.time()
    store._client.set(key, f"{now - 100:.3f} {now + 800:.3f} alice with spaces", ex=800)
    found = store.lookup(A)
    assert found is not None
    assert found.users == ("alice with spaces",)
    assert found.expires_at == pytest.approx(now + 800, abs=0.01)
    assert [(g.address, g.user) for g in store.entries()] == [(A, "alice with spaces")]
    assert store.renew(A, "bob") is None
    assert store._client.type(key) == b"hash"  # a change converts it
    assert 799 <= store._client.ttl(key) <= 800
    assert not store.grant(A, "bob").renewed
    found = store.lookup(A)
    assert found is not None
    assert found.users == ("alice with spaces", "bob")
    store._client.set("popauth:192.0.2.2", f"{now:.3f} {now + 800:.3f} carol", ex=800)
    assert [g.user for g in store.revoke_user("carol")] == ["carol"]
    assert store._client.exists("popauth:192.0.2.2") == 0


def test_graduates_are_shared_by_every_host_and_fail_closed_when_redis_is_down(
    redis_server: RedisInstance,
) -> None:
    host_a, host_b = make_store(redis_server), make_store(redis_server)
    on_a = RedisGraduates(host_a.client, host_a.graduates_key)
    on_b = RedisGraduates(host_b.client, host_b.graduates_key)
    other_site = make_store(redis_server, prefix="othersite:")
    elsewhere = RedisGraduates(other_site.client, other_site.graduates_key)
    assert on_a.graduate("Alice", 1000.0)
    assert not on_b.graduate("alice", 2000.0)  # one record, the first time kept
    assert on_b.graduated_among(("alice", "bob", "ALICE")) == {"alice", "ALICE"}
    assert elsewhere.graduated_among(("alice",)) == frozenset()
    assert on_b.reinstate("alice", 3000.0) == Graduation(1000.0)
    assert on_a.reinstate("alice", 3001.0) is None  # once, from whichever host
    assert on_a.graduated_among(("alice",)) == frozenset()
    assert not on_a.graduate("alice", 4000.0)  # a reinstated user does not graduate again
    assert on_a.records() == {"alice": Graduation(1000.0, 3000.0)}
    assert on_b.reinstate("carol", 3000.0) is None
    redis_server.stop()
    try:
        with pytest.raises(StoreUnavailable):
            on_a.graduated_among(("alice",))
        with pytest.raises(StoreUnavailable):
            on_a.graduate("dave", 5000.0)
        with pytest.raises(StoreUnavailable):
            on_a.reinstate("alice", 5000.0)
    finally:
        redis_server.start()
