"""The ingest endpoint over a real UNIX socket, in-process."""

from __future__ import annotations

import pwd
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from harness.shared_runtime import shared_runtime
from popauth.basics.addresses import IPAddress, parse_client_address
from popauth.basics.posixids import system_user
from popauth.doors.ingest.protocol import MAX_LINE, parse_fields
from popauth.doors.ingest.roles import Members
from popauth.doors.ingest.server import PeerPolicy
from popauth.doors.ingest.wire import RENEW_BATCH
from popauth.doors.sockets import SocketInUse
from popauth.store import Grant, GrantOutcome, NotConfirmed, Renewal, StoreUnavailable
from popauth.store.accounts import RelayWay
from popauth.store.memory import MemoryStore
from tests.support.ingest_endpoint import Endpoint
from tests.support.logs import events
from tests.support.peers import needs_root

A = parse_client_address("192.0.2.1")


@pytest.fixture
def endpoint(tmp_path: Path) -> Iterator[Endpoint]:
    # Overrides the shared fixture: a short request timeout for the timeout tests.
    server = Endpoint(tmp_path, timeout=0.5)
    server.server.start()
    yield server
    server.server.stop()


def test_every_verb(endpoint: Endpoint) -> None:
    assert endpoint.ask("PING") == ["OK pong"]
    reply = endpoint.ask("LOGIN 192.0.2.1 alice")[0]
    assert reply.startswith("OK address=192.0.2.1 user=alice ")
    assert reply.endswith("renewed=no")
    assert endpoint.ask("LOGIN ::ffff:192.0.2.1 alice")[0].endswith("renewed=yes")
    assert endpoint.ask("QUERY 192.0.2.1")[0].startswith("OK address=192.0.2.1 user=alice")
    endpoint.ask("LOGIN 2001:db8:0:1::99 bob")
    assert endpoint.ask("QUERY 2001:db8:0:1::5")[0].startswith(
        "OK address=2001:db8:0:1::/64 user=bob"
    )
    listing = endpoint.ask("LIST")
    assert listing[0] == "OK count=2"
    assert [line.split()[0] for line in listing[1:]] == [
        "address=192.0.2.1",
        "address=2001:db8:0:1::/64",
    ]
    assert endpoint.ask("REVOKE 192.0.2.1")[0].startswith("OK address=192.0.2.1")
    assert endpoint.ask("QUERY 192.0.2.1") == ["NOTFOUND address=192.0.2.1"]
    assert endpoint.ask("REVOKE 192.0.2.1") == ["NOTFOUND address=192.0.2.1"]
    stats = endpoint.ask("STATS")[0]
    assert " entries=1 " in stats
    assert " grants=3 " in stats


def test_several_requests_on_one_connection(endpoint: Endpoint) -> None:
    with endpoint.raw() as connection:
        connection.sendall(b"PING\nLOGIN 192.0.2.1 alice\nQUERY 192.0.2.1\nQUIT\n")
        data = b""
        while chunk := connection.recv(4096):
            data += chunk
    lines = data.decode().splitlines()
    assert lines[0] == "OK pong"
    assert lines[1].startswith("OK address=192.0.2.1")
    assert lines[2].startswith("OK address=192.0.2.1")
    assert lines[3] == "OK bye"


def assert_unchanged_and_serving(endpoint: Endpoint) -> None:
    assert endpoint.store.stats().grants == 0
    assert endpoint.ask("PING") == ["OK pong"]


@pytest.mark.parametrize(
    ("line", "reply_start"),
    [
        ("garbage", "ERR syntax"),
        ("LOGIN 999.1.1.1 alice", "ERR address"),
        ("LOGIN 192.0.2.1 alice bob", "ERR syntax"),
        ("LOGIN", "ERR syntax"),
        # Issue 11, defect 11: no client has these addresses.
        ("LOGIN 0.0.0.0 alice", "ERR address"),
        ("LOGIN 255.255.255.255 alice", "ERR address"),
        ("LOGIN :: alice", "ERR address"),
        ("LOGIN 224.0.0.1 alice", "ERR address"),
        ("LOGIN ff02::1 alice", "ERR address"),
        ("LOGIN 192.0.2.1%eth0 alice", "ERR address"),
        ("LOGIN [192.0.2.1] alice", "ERR address"),
        ("LOGIN IPv6:192.0.2.1 alice", "ERR address"),
    ],
)
def test_bad_requests_get_errors(endpoint: Endpoint, line: str, reply_start: str) -> None:
    assert endpoint.ask(line)[0].startswith(reply_start)
    assert_unchanged_and_serving(endpoint)


def test_binary_garbage(endpoint: Endpoint) -> None:
    with endpoint.raw() as connection:
        connection.sendall(b"\xff\xfe\x00LOGIN 192.0.2.1\n")
        assert connection.recv(4096).startswith(b"ERR syntax")
    assert_unchanged_and_serving(endpoint)


def test_line_too_long(endpoint: Endpoint) -> None:
    with endpoint.raw() as connection:
        connection.sendall(b"LOGIN 192.0.2.1 " + b"x" * (MAX_LINE * 4) + b"\n")
        assert connection.recv(4096).startswith(b"ERR too-long")
    assert_unchanged_and_serving(endpoint)


def test_client_hangs_up_mid_line(endpoint: Endpoint) -> None:
    with endpoint.raw() as connection:
        connection.sendall(b"LOGIN 192.0.2.1 ali")
    deadline = time.monotonic() + 5
    while "ingest_partial_request" not in events(endpoint.sink):
        assert time.monotonic() < deadline, events(endpoint.sink)
        time.sleep(0.01)
    assert_unchanged_and_serving(endpoint)


def test_silent_client_times_out(endpoint: Endpoint) -> None:
    with endpoint.raw() as connection:
        assert endpoint.ask("PING") == ["OK pong"]  # others are served meanwhile
        assert connection.recv(4096).startswith(b"ERR timeout")
        assert connection.recv(4096) == b""
    assert_unchanged_and_serving(endpoint)


def test_many_concurrent_clients(endpoint: Endpoint) -> None:
    failures: list[str] = []

    def login(n: int) -> None:
        reply = endpoint.ask(f"LOGIN 10.0.{n // 200}.{n % 200} user{n}")[0]
        if not reply.startswith("OK "):
            failures.append(reply)

    threads = [threading.Thread(target=login, args=(n,)) for n in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert endpoint.store.stats().entries == 64


def test_too_many_clients_are_told_to_come_back(tmp_path: Path) -> None:
    busy = Endpoint(tmp_path, timeout=5, max_clients=2)
    busy.server.start()
    try:
        held = [busy.raw(), busy.raw()]
        for connection in held:  # both served, and both in the middle of a request
            connection.sendall(b"PING\nPIN")
            assert connection.recv(100) == b"OK pong\n"
        # Refused at once, before it says anything (a request sent now could
        # meet the closed socket).
        with busy.raw() as refused:
            assert refused.recv(100).startswith(b"ERR busy")
        for connection in held:
            connection.close()
    finally:
        busy.server.stop()


def test_when_full_the_longest_idle_client_makes_room(tmp_path: Path) -> None:
    full = Endpoint(tmp_path, timeout=5, max_clients=2)
    full.server.start()
    try:
        oldest, newer = full.raw(), full.raw()
        newer.sendall(b"PING\n")
        assert newer.recv(100) == b"OK pong\n"
        # Both idle: the newcomer is served, the one idle longest is closed.
        assert full.ask("PING") == ["OK pong"]
        assert oldest.recv(100).startswith(b"ERR timeout")
        assert oldest.recv(100) == b""
        newer.sendall(b"PING\n")
        assert newer.recv(100) == b"OK pong\n"
    finally:
        full.server.stop()


def test_state_changes_need_an_allowed_peer(tmp_path: Path) -> None:
    # A policy in which this process (root) holds no role at all.
    strict = Endpoint(tmp_path, peers=PeerPolicy(Members(frozenset({4242}), frozenset({4242}))))
    strict.server.start()
    try:
        assert strict.ask("LOGIN 192.0.2.1 alice")[0].startswith("ERR forbidden")
        assert strict.ask("REVOKE 192.0.2.1")[0].startswith("ERR forbidden")
        assert strict.ask("QUERY 192.0.2.1")[0].startswith("ERR forbidden")
        assert strict.ask("STATS")[0].startswith("ERR forbidden")
        assert strict.ask("PING") == ["OK pong"]
        assert strict.store.stats().grants == 0
    finally:
        strict.server.stop()


@needs_root
def test_peer_credentials_of_other_users(open_tmp: Path) -> None:
    allowed = pwd.getpwnam("nobody")
    peers = PeerPolicy.of([system_user("nobody")], [])
    server = Endpoint(open_tmp, peers=peers)
    server.server.start()
    client = (
        "import sys; from popauth.doors.ingest.client import IngestClient; "
        "print(IngestClient(sys.argv[1]).request(sys.argv[2])[0])"
    )
    try:
        as_nobody = subprocess.run(
            [*shared_runtime().python(client), str(server.path), "LOGIN 192.0.2.1 alice"],
            user=allowed.pw_uid,
            capture_output=True,
            text=True,
            check=True,
        )
        assert as_nobody.stdout.startswith("OK address=192.0.2.1")
        as_daemon = subprocess.run(
            [*shared_runtime().python(client), str(server.path), "LOGIN 192.0.2.2 mallory"],
            user="daemon",
            capture_output=True,
            text=True,
            check=True,
        )
        assert as_daemon.stdout.startswith("ERR forbidden")
        assert server.store.lookup(parse_client_address("192.0.2.2")) is None
    finally:
        server.server.stop()


def test_socket_mode_and_cleanup(tmp_path: Path) -> None:
    server = Endpoint(tmp_path)
    server.server.start()
    assert stat.S_IMODE(server.path.stat().st_mode) == 0o666
    with pytest.raises(SocketInUse):
        Endpoint(tmp_path).server.start()
    server.server.stop()
    assert not server.path.exists()


def test_stale_socket_is_replaced_but_other_files_are_not(tmp_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "ingest.sock"))
    stale.close()  # the file stays, nobody listens
    server = Endpoint(tmp_path)
    server.server.start()
    assert server.ask("PING") == ["OK pong"]
    server.server.stop()
    (tmp_path / "ingest.sock").write_text("not a socket")
    with pytest.raises(SocketInUse, match="not a socket"):
        Endpoint(tmp_path).server.start()


def test_block_revokes_refuses_logins_and_unblock_restores(endpoint: Endpoint) -> None:
    endpoint.ask("LOGIN 192.0.2.1 mallory")
    endpoint.ask("LOGIN 192.0.2.2 mallory")
    endpoint.ask("LOGIN 192.0.2.3 alice")
    assert endpoint.ask("BLOCK mallory") == ["OK user=mallory revoked=2 blocked=new"]
    assert endpoint.ask("BLOCK mallory") == ["OK user=mallory revoked=0 blocked=already"]
    assert endpoint.ask("LOGIN 192.0.2.1 mallory")[0] == "ERR blocked user mallory is blocked"
    assert endpoint.ask("QUERY 192.0.2.1") == ["NOTFOUND address=192.0.2.1"]
    assert endpoint.ask("QUERY 192.0.2.3")[0].startswith("OK ")
    assert endpoint.ask("BLOCKED") == ["OK count=1", "user=mallory"]
    assert endpoint.ask("UNBLOCK mallory") == ["OK user=mallory"]
    assert endpoint.ask("UNBLOCK mallory") == ["NOTFOUND user=mallory"]
    assert endpoint.ask("LOGIN 192.0.2.1 mallory")[0].startswith("OK ")


def test_revoke_every_entry_of_a_user(endpoint: Endpoint) -> None:
    endpoint.ask("LOGIN 192.0.2.1 alice")
    endpoint.ask("LOGIN 192.0.2.2 alice")
    endpoint.ask("LOGIN 192.0.2.3 bob")
    assert endpoint.ask("REVOKEUSER alice") == ["OK user=alice revoked=2"]
    assert [line.split()[0] for line in endpoint.ask("LIST")[1:]] == ["address=192.0.2.3"]


def test_report_lists_pop_first_users(endpoint: Endpoint) -> None:
    endpoint.ledger.record("alice", RelayWay.POP_FIRST, messages=3, recipients=4)
    endpoint.ledger.record("bob", RelayWay.SMTP_AUTH, messages=1, recipients=1)
    reply = endpoint.ask("REPORT")
    assert reply[0] == "OK count=1"
    assert reply[1].startswith("user=alice pop_messages=3 pop_recipients=4 ")


@needs_root
def test_block_list_changes_need_an_administrator(open_tmp: Path) -> None:
    hook_user = pwd.getpwnam("nobody")
    server = Endpoint(open_tmp, peers=PeerPolicy.of([system_user("nobody")], []))
    server.server.start()
    client = (
        "import sys; from popauth.doors.ingest.client import IngestClient; "
        "print(IngestClient(sys.argv[1]).request(sys.argv[2])[0])"
    )
    try:
        for line, expected in (
            ("BLOCK alice", "ERR forbidden"),
            ("UNBLOCK alice", "ERR forbidden"),
            ("LOGIN 192.0.2.1 alice", "OK "),
            ("REVOKEUSER alice", "ERR forbidden"),
            ("REINSTATE alice", "ERR forbidden"),
        ):
            reply = subprocess.run(
                [*shared_runtime().python(client), str(server.path), line],
                user=hook_user.pw_uid,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            assert reply.startswith(expected), (line, reply)
        assert server.blocklist.users() == []
    finally:
        server.server.stop()


def test_metrics_count_ingest_requests(endpoint: Endpoint) -> None:
    endpoint.ask("LOGIN 192.0.2.1 alice")
    endpoint.ask("QUERY 192.0.2.9")
    endpoint.ask("garbage")
    registry = endpoint.metrics.registry
    assert (
        registry.get_sample_value(
            "popauth_ingest_requests_total", {"verb": "LOGIN", "result": "ok"}
        )
        == 1
    )
    assert (
        registry.get_sample_value(
            "popauth_ingest_requests_total", {"verb": "QUERY", "result": "notfound"}
        )
        == 1
    )
    assert (
        registry.get_sample_value(
            "popauth_ingest_requests_total", {"verb": "invalid", "result": "syntax"}
        )
        == 1
    )


class SlowStore(MemoryStore):
    """A store that may block (like Redis): the endpoint calls it off its loop."""

    may_block = True

    def grant(self, address: IPAddress, user: str) -> GrantOutcome:
        time.sleep(1.0)
        return super().grant(address, user)


def test_blocking_store_keeps_replies_in_order_and_serves_others(tmp_path: Path) -> None:
    slow = Endpoint(tmp_path, store_class=SlowStore, timeout=5)
    slow.server.start()
    try:
        with slow.raw() as connection:
            connection.sendall(b"LOGIN 192.0.2.1 alice\nQUERY 192.0.2.1\nPING\n")
            started = time.monotonic()
            assert slow.ask("PING") == ["OK pong"]  # not held up by the slow grant
            assert time.monotonic() - started < 0.5
            data = b""
            while data.count(b"\n") < 3:
                data += connection.recv(4096)
        lines = data.decode().splitlines()
        assert lines[0].startswith("OK address=192.0.2.1 user=alice")
        assert lines[1].startswith("OK address=192.0.2.1 user=alice")
        assert lines[2] == "OK pong"
    finally:
        slow.server.stop()


class WaitingListingStore(MemoryStore):
    """A fast store whose listings and user revocations wait for a login to be answered."""

    login_answered = threading.Event()

    def entry_chunks(self) -> Iterator[list[Grant]]:
        assert self.login_answered.wait(5), "the listing held up the logins"
        return super().entry_chunks()

    def revoke_user(self, user: str) -> list[Grant]:
        assert self.login_answered.wait(5), "the revocation held up the logins"
        return super().revoke_user(user)


@pytest.mark.parametrize("request_line", ["LIST", "REVOKEUSER alice", "BLOCK mallory"])
def test_whole_whitelist_requests_leave_the_loop_to_logins(
    tmp_path: Path, request_line: str
) -> None:
    WaitingListingStore.login_answered = threading.Event()
    server = Endpoint(tmp_path, store_class=WaitingListingStore, timeout=10)
    server.server.start()
    try:
        with server.raw() as connection:
            connection.sendall(request_line.encode() + b"\n")
            assert server.ask("LOGIN 192.0.2.1 alice")[0].startswith("OK address=192.0.2.1")
            WaitingListingStore.login_answered.set()
            assert connection.recv(4096).startswith(b"OK ")
    finally:
        server.server.stop()


def test_half_closed_client_still_gets_every_reply(tmp_path: Path) -> None:
    """Like `printf 'LOGIN …\\n' | socat - UNIX-CONNECT:…`: send, shut down writing, read."""
    slow = Endpoint(tmp_path, store_class=SlowStore, timeout=5)
    slow.server.start()
    try:
        with slow.raw() as connection:
            connection.sendall(b"LOGIN 192.0.2.1 alice\nQUERY 192.0.2.1\n")
            connection.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := connection.recv(4096):
                data += chunk
        lines = data.decode().splitlines()
        assert [line.split()[0] for line in lines] == ["OK", "OK"]
        assert lines[1].startswith("OK address=192.0.2.1 user=alice")
    finally:
        slow.server.stop()


def test_renew_extends_only_an_entry_of_the_same_user(endpoint: Endpoint) -> None:
    endpoint.ask("LOGIN 192.0.2.1 alice")
    endpoint.clock.advance(800)
    reply = endpoint.ask("RENEW 192.0.2.1 alice")[0]
    fields = parse_fields(reply.removeprefix("OK "))
    assert reply.startswith("OK address=192.0.2.1 user=alice ")
    assert int(fields["expires"]) == int(endpoint.clock.time()) + 900
    endpoint.clock.advance(800)
    assert endpoint.ask("QUERY 192.0.2.1")[0].startswith("OK address=192.0.2.1 user=alice")
    assert endpoint.ask("RENEW 192.0.2.1 bob") == ["NOTFOUND address=192.0.2.1"]
    # Never creates: no entry, no whitelisting.
    assert endpoint.ask("RENEW 192.0.2.2 alice") == ["NOTFOUND address=192.0.2.2"]
    assert endpoint.ask("QUERY 192.0.2.2") == ["NOTFOUND address=192.0.2.2"]
    assert endpoint.store.stats().grants == 1


def test_revoke_and_block_win_over_renewals(endpoint: Endpoint) -> None:
    endpoint.ask("LOGIN 192.0.2.1 alice")
    endpoint.ask("LOGIN 192.0.2.2 mallory")
    endpoint.ask("REVOKE 192.0.2.1")
    assert endpoint.ask("RENEW 192.0.2.1 alice") == ["NOTFOUND address=192.0.2.1"]
    assert endpoint.ask("QUERY 192.0.2.1") == ["NOTFOUND address=192.0.2.1"]
    endpoint.ask("BLOCK mallory")
    assert endpoint.ask("RENEW 192.0.2.2 mallory") == ["ERR blocked user mallory is blocked"]
    assert endpoint.ask("QUERY 192.0.2.2") == ["NOTFOUND address=192.0.2.2"]
    assert "renew_refused_blocked" in events(endpoint.sink)
    # A blocked user's entry that is still there (blocked straight in the
    # block list, without the revoke of BLOCK) is not extended either.
    endpoint.blocklist.remove("mallory")
    endpoint.store.grant(parse_client_address("192.0.2.3"), "mallory")
    endpoint.blocklist.add("mallory")
    assert endpoint.ask("RENEW 192.0.2.3 mallory")[0].startswith("ERR blocked")
    # The next real login brings alice's entry back, and renewals work again.
    endpoint.ask("LOGIN 192.0.2.1 alice")
    assert endpoint.ask("RENEW 192.0.2.1 alice")[0].startswith("OK ")


def test_renew_needs_a_peer_that_may_report_logins(tmp_path: Path) -> None:
    strict = Endpoint(tmp_path, peers=PeerPolicy(Members(frozenset({4242}), frozenset({4242}))))
    strict.server.start()
    try:
        strict.store.grant(A, "alice")
        strict.clock.advance(800)
        assert strict.ask("RENEW 192.0.2.1 alice")[0].startswith("ERR forbidden")
        grant = strict.store.lookup(A)
        assert grant is not None
        assert grant.expires_at == strict.clock.time() + 100
    finally:
        strict.server.stop()


def test_a_batch_of_renewals_on_one_connection(endpoint: Endpoint) -> None:
    for n in range(50):
        endpoint.ask(f"LOGIN 198.51.100.{n} user{n}")
    batch = "".join(f"RENEW 198.51.100.{n} user{n % 40}\n" for n in range(100)).encode()
    with endpoint.raw() as connection:
        connection.sendall(batch + b"QUIT\n")
        data = b""
        while chunk := connection.recv(65536):
            data += chunk
    lines = data.decode().splitlines()
    assert len(lines) == 101
    assert lines[-1] == "OK bye"
    found = [n for n, line in enumerate(lines[:100]) if line.startswith("OK ")]
    assert found == list(range(40))
    assert all(line.startswith("NOTFOUND ") for line in lines[40:100])


class GatedStore(MemoryStore):
    """A store that may block, whose first batch of renewals waits for a go,
    and which records the size of every batch it is asked to renew."""

    may_block = True

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        self.entered = threading.Event()
        self.go = threading.Event()
        self.batches: list[int] = []

    def renew_many(self, sessions: Sequence[tuple[IPAddress, str]]) -> list[Renewal]:
        if not self.batches:
            self.entered.set()
            assert self.go.wait(10), "the test never let the first batch go"
        self.batches.append(len(sessions))
        return super().renew_many(sessions)


def read_lines(connection: socket.socket, count: int) -> list[str]:
    data = b""
    while (received := data.count(b"\n")) < count:
        chunk = connection.recv(65536)
        assert chunk, f"closed after {received} of {count} replies"
        data += chunk
    return data.decode().splitlines()


def test_pipelined_renewals_are_applied_in_batches_with_one_reply_each(tmp_path: Path) -> None:
    door = Endpoint(tmp_path, store_class=GatedStore, timeout=10)
    store = door.store
    assert isinstance(store, GatedStore)
    door.server.start()
    try:
        for n in range(1, 951):
            store.grant(parse_client_address(f"10.0.{n // 250}.{n % 250}"), f"user{n}")
        # Lines 1..950 of the pipeline; a bad one and a PING in the middle.
        lines = [f"RENEW 10.0.{n // 250}.{n % 250} user{n}" for n in range(1, 951)]
        lines[299] = "RENEW 999.0.0.1 user300"
        lines[699] = "PING"
        with door.raw() as connection:
            connection.sendall(f"{lines[0]}\n".encode())
            # The first renewal holds the door: everything else arrives meanwhile.
            assert store.entered.wait(10)
            connection.sendall("".join(f"{line}\n" for line in lines[1:]).encode() + b"QUIT\n")
            store.go.set()
            replies = read_lines(connection, len(lines) + 1)
        assert len(replies) == len(lines) + 1
        assert replies[-1] == "OK bye"
        for number, (line, reply) in enumerate(zip(lines, replies, strict=False), 1):
            if number == 300:
                assert reply.startswith("ERR address"), reply
            elif number == 700:
                assert reply == "OK pong"
            else:
                assert reply.startswith(f"OK address={line.split()[1]} user=user{number} "), reply
        # One alone, then what had arrived: at most RENEW_BATCH requests at a
        # time (the bad one answered in place), the PING ending one batch.
        assert store.batches == [1, RENEW_BATCH - 1, 198, 250], store.batches
    finally:
        door.server.stop()


class FailingRenewals(MemoryStore):
    may_block = True
    failure: Exception = StoreUnavailable("redis: connection refused")

    def renew_many(self, sessions: Sequence[tuple[IPAddress, str]]) -> list[Renewal]:
        raise self.failure


class BrokenRenewals(FailingRenewals):
    failure = RuntimeError("a bug")


@pytest.mark.parametrize(
    ("store_class", "reply", "event"),
    [
        (
            FailingRenewals,
            "ERR unavailable whitelist store unavailable",
            "ingest_store_unavailable",
        ),
        (
            BrokenRenewals,
            "ERR internal unexpected error, logged by popauth",
            "ingest_internal_error",
        ),
    ],
)
def test_a_batch_the_store_cannot_renew_gets_one_error_per_request(
    tmp_path: Path, store_class: type[MemoryStore], reply: str, event: str
) -> None:
    door = Endpoint(tmp_path, store_class=store_class)
    door.server.start()
    try:
        batch = "".join(f"RENEW 192.0.2.{n} user{n}\n" for n in range(1, 101))
        with door.raw() as connection:
            connection.sendall(f"{batch}RENEW nonsense x\nPING\n".encode())
            replies = read_lines(connection, 102)
        assert len(replies) == 102
        assert replies[-2].startswith("ERR address")
        assert replies[-1] == "OK pong"
        assert set(replies[:100]) == {reply}
        logged = [call.kwargs for call in door.sink.calls if call.kwargs.get("event") == event]
        assert logged
        assert sum(fields.get("requests", 1) for fields in logged) == 100
        assert (
            door.metrics.registry.get_sample_value(
                "popauth_ingest_requests_total",
                {"verb": "RENEW", "result": reply.split()[1]},
            )
            == 100
        )
    finally:
        door.server.stop()


def test_renewals_in_a_batch_are_counted_by_result(endpoint: Endpoint) -> None:
    for n in range(1, 31):
        endpoint.ask(f"LOGIN 192.0.2.{n} user{n}")
    endpoint.ask("BLOCK user30")
    batch = "".join(f"RENEW 192.0.2.{n} user{n}\n" for n in range(1, 41))
    with endpoint.raw() as connection:
        connection.sendall(batch.encode())
        replies = read_lines(connection, 40)
    assert [reply.split()[0] for reply in replies] == ["OK"] * 29 + ["ERR"] + ["NOTFOUND"] * 10
    registry = endpoint.metrics.registry
    counts = {
        result: registry.get_sample_value(
            "popauth_ingest_requests_total", {"verb": "RENEW", "result": result}
        )
        for result in ("ok", "err", "notfound")
    }
    assert counts == {"ok": 29, "err": 1, "notfound": 10}


class UnreplicatedStore(MemoryStore):
    """A store whose replicas confirm nothing (as Redis with a replica cut off)."""

    def grant(self, address: IPAddress, user: str) -> GrantOutcome:
        raise NotConfirmed(0, 1, undone=True)

    def confirm_changes(self) -> None:
        raise NotConfirmed(0, 1, undone=False)


def test_changes_the_replicas_do_not_confirm_say_what_holds(tmp_path: Path) -> None:
    door = Endpoint(tmp_path, store_class=UnreplicatedStore)
    door.server.start()
    try:
        assert door.ask("LOGIN 192.0.2.1 alice") == [
            "ERR unavailable 0 of 1 replicas confirmed it; undone, nothing changed"
        ]
        for line in ("BLOCK mallory", "UNBLOCK bob", "REVOKE 192.0.2.1", "REVOKEUSER alice"):
            verb = line.split()[0]
            assert door.ask(line) == [
                f"ERR incomplete {verb} is in force on the Redis master, but only 0 of 1 "
                "replicas confirmed it: a failover may undo it; repeat it when the replicas "
                "are back"
            ]
        # The block is in force all the same: undoing it would reopen the door.
        assert door.blocklist.users() == ["mallory"]
    finally:
        door.server.stop()
    logged = [c.kwargs for c in door.sink.calls if c.kwargs.get("event") == "change_not_confirmed"]
    assert [(e["verb"], e["state"]) for e in logged] == [
        ("LOGIN", "undone"),
        ("BLOCK", "in force on the master only"),
        ("UNBLOCK", "in force on the master only"),
        ("REVOKE", "in force on the master only"),
        ("REVOKEUSER", "in force on the master only"),
    ]
    assert logged[0]["client_ip"] == "192.0.2.1"
    assert logged[1]["user"] == "mallory"
    registry = door.metrics.registry
    incomplete = {"verb": "BLOCK", "result": "incomplete"}
    assert registry.get_sample_value("popauth_ingest_requests_total", incomplete) == 1


class RevokeFailingStore(MemoryStore):
    def revoke_user(self, user: str) -> list[Grant]:
        raise StoreUnavailable("redis: connection reset")


def test_a_block_whose_revoke_fails_says_the_block_holds(tmp_path: Path) -> None:
    door = Endpoint(tmp_path, store_class=RevokeFailingStore)
    door.server.start()
    try:
        door.store.grant(A, "mallory")
        assert door.ask("BLOCK mallory") == [
            "ERR incomplete user mallory is blocked, but their entries could not be revoked: "
            "repeat BLOCK"
        ]
        assert door.blocklist.users() == ["mallory"]
        assert door.ask("LOGIN 192.0.2.2 mallory")[0].startswith("ERR blocked ")
        assert door.ask("REVOKEUSER mallory") == ["ERR unavailable whitelist store unavailable"]
    finally:
        door.server.stop()
    assert "block_not_revoked" in events(door.sink)
    incomplete = {"verb": "BLOCK", "result": "incomplete"}
    assert door.metrics.registry.get_sample_value("popauth_ingest_requests_total", incomplete) == 1


def test_blocks_match_names_caselessly(endpoint: Endpoint) -> None:
    endpoint.ask("LOGIN 192.0.2.1 alice")
    endpoint.ask("LOGIN 192.0.2.2 ALICE")
    assert endpoint.ask("BLOCK Alice") == ["OK user=Alice revoked=2 blocked=new"]
    assert endpoint.ask("BLOCK ALICE") == ["OK user=ALICE revoked=0 blocked=already"]
    assert endpoint.ask("BLOCKED") == ["OK count=1", "user=alice"]
    for spelling in ("alice", "aLiCe", "Älice", "\uff41\uff4c\uff49\uff43\uff45"):  # fullwidth
        assert endpoint.ask(f"LOGIN 192.0.2.3 {spelling}")[0].startswith("ERR blocked "), spelling
    assert endpoint.ask("QUERY 192.0.2.3") == ["NOTFOUND address=192.0.2.3"]
    assert endpoint.ask("UNBLOCK ALICE") == ["OK user=ALICE"]
    assert endpoint.ask("LOGIN 192.0.2.3 alice")[0].startswith("OK ")


def test_every_user_of_an_address_is_shown_and_revoked_alone(endpoint: Endpoint) -> None:
    assert endpoint.ask("LOGIN 192.0.2.1 alice")[0].endswith("renewed=no")
    assert endpoint.ask("LOGIN 192.0.2.1 bob")[0].endswith("renewed=no")
    assert endpoint.ask("LOGIN 192.0.2.1 alice")[0].endswith("renewed=yes")
    # QUERY: the fields as before (the newest login), and users= all of them.
    fields = parse_fields(endpoint.ask("QUERY 192.0.2.1")[0])
    assert (fields["user"], fields["users"]) == ("alice", "bob,alice")
    # LIST: the same line format, a line per user.
    listing = endpoint.ask("LIST")
    assert listing[0] == "OK count=2"
    assert [parse_fields(line)["user"] for line in listing[1:]] == ["bob", "alice"]
    assert {parse_fields(line)["address"] for line in listing[1:]} == {"192.0.2.1"}
    assert endpoint.ask("RENEW 192.0.2.1 carol") == ["NOTFOUND address=192.0.2.1"]
    assert endpoint.ask("RENEW 192.0.2.1 bob")[0].startswith("OK address=192.0.2.1 user=bob")
    assert endpoint.ask("REVOKEUSER bob") == ["OK user=bob revoked=1"]
    fields = parse_fields(endpoint.ask("QUERY 192.0.2.1")[0])
    assert (fields["user"], fields["users"]) == ("alice", "alice")
    assert endpoint.ask("STATS")[0].startswith("OK entries=1 ")
    assert endpoint.ask("REVOKEUSER alice") == ["OK user=alice revoked=1"]
    assert endpoint.ask("QUERY 192.0.2.1") == ["NOTFOUND address=192.0.2.1"]


def test_a_comma_in_a_user_name_is_escaped_in_the_user_list(endpoint: Endpoint) -> None:
    endpoint.ask("LOGIN 192.0.2.1 doe,jane")
    endpoint.ask("LOGIN 192.0.2.1 back\\slash")
    fields = parse_fields(endpoint.ask("QUERY 192.0.2.1")[0])
    assert fields["users"] == "doe\\x2cjane,back\\x5cslash"
