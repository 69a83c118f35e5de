"""Open IMAP sessions keep relaying: real Dovecot, real Postfix, ``popauth sessions``.

A short ttl (4 s) and renewal interval (0.5 s) stand for the real 900 s and
225 s: an entry survives up to seven late or lost cycles, so a loaded
machine does not turn a slow cycle into a refusal. Dovecot's post-login
hook whitelists the client at login; ``popauth sessions`` lists the open
sessions with the real ``doveadm who`` and renews them; Postfix asks the
popauth milter at RCPT.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from harness.dovecot import DovecotInstance, ImapSession
from harness.popauth import PopauthServer, SessionsProcess
from harness.ports import free_port
from harness.postfix import PostfixInstance
from harness.redis import RedisInstance
from harness.smtp import REMOTE, rcpt_reply
from popauth.companions.sessions import RenewalCounts, Session, renew_sessions
from popauth.doors.ingest.client import IngestClient
from tests.live.conftest import LIVE_SETTINGS, USERS, PopauthFactory

pytestmark = pytest.mark.live

TTL = 4
INTERVAL = 0.5
# How late the last renewal and the refused RCPT itself may come on a loaded
# machine: a cycle that listed the session just before the logout renews it
# once more, and each RCPT is a whole SMTP session.
LATENESS = 1.0


def imap_port(dovecot: DovecotInstance) -> int:
    assert dovecot.imap_port is not None, "the live Dovecot serves IMAP"
    return dovecot.imap_port


def relay_code(postfix: PostfixInstance, client: str) -> int:
    return rcpt_reply(postfix.smtp_port, client, REMOTE)[0]


def assert_refused(postfix: PostfixInstance, client: str) -> None:
    code, text = rcpt_reply(postfix.smtp_port, client, REMOTE)
    assert (code, text.split(" ", 1)[0]) == (550, "5.7.1"), (code, text)


def hold_and_check_relaying(postfix: PostfixInstance, client: str, seconds: float) -> int:
    """Relay from ``client`` every 0.25 s for ``seconds``; every RCPT must get 250."""
    checks = 0
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        assert relay_code(postfix, client) == 250, f"refused after {checks} accepted RCPTs"
        checks += 1
        time.sleep(0.25)
    return checks


def seconds_until_refused(postfix: PostfixInstance, client: str, limit: float) -> float:
    """Poll RCPTs from ``client`` until one is refused; the seconds that took."""
    started = time.monotonic()
    while relay_code(postfix, client) == 250:
        assert time.monotonic() - started < limit, f"still relaying after {limit}s"
        time.sleep(0.05)
    elapsed = time.monotonic() - started
    assert_refused(postfix, client)
    return elapsed


@dataclass
class Site:
    """Where the RCPTs go (Postfix and the popauth it asks) and the Dovecot host's popauth."""

    postfix: PostfixInstance
    mta_popauth: PopauthServer
    dovecot_popauth: PopauthServer
    sessions: SessionsProcess


@pytest.fixture
def one_host(
    live_root: Path,
    dovecot: DovecotInstance,
    postfix: PostfixInstance,
    start_popauth: PopauthFactory,
    tmp_path: Path,
) -> Iterator[Site]:
    """Dovecot, popauth (memory store) and Postfix on one host."""
    popauth = start_popauth(ttl=TTL)
    with SessionsProcess(
        directory=tmp_path / "sessions",
        dovecot=dovecot,
        ingest_socket=popauth.ingest_path,
        ttl=TTL,
        interval=INTERVAL,
    ) as sessions:
        yield Site(postfix, popauth, popauth, sessions)


def test_an_open_imap_session_keeps_relaying_and_logout_ends_it(
    one_host: Site, dovecot: DovecotInstance
) -> None:
    site = one_host
    with ImapSession(imap_port(dovecot), "alice", USERS["alice"], "127.0.0.2") as session:
        logged_in = time.monotonic()
        assert relay_code(site.postfix, "127.0.0.2") == 250
        hold_and_check_relaying(site.postfix, "127.0.0.2", 2.5 * TTL)
        assert time.monotonic() - logged_in > 2 * TTL
        assert relay_code(site.postfix, "127.0.0.2") == 250
        assert relay_code(site.postfix, "127.0.0.3") == 550  # nobody else
        session.logout()
    # The entry outlives the session by at most ttl (and the cycle in flight).
    refused_after = seconds_until_refused(site.postfix, "127.0.0.2", limit=3 * TTL)
    assert refused_after <= TTL + INTERVAL + LATENESS, refused_after
    renewed = site.sessions.events("sessions_renewed")
    assert sum(event["renewed"] for event in renewed) >= 2 * TTL / INTERVAL
    assert all(event["errors"] == 0 for event in renewed)


def test_a_revoke_during_an_open_session_stays_revoked(
    one_host: Site, dovecot: DovecotInstance
) -> None:
    site = one_host
    with ImapSession(imap_port(dovecot), "bob", USERS["bob"], "127.0.0.4"):
        assert relay_code(site.postfix, "127.0.0.4") == 250
        revoke = site.dovecot_popauth.cli("revoke", "127.0.0.4")
        assert revoke.returncode == 0, revoke
        assert_refused(site.postfix, "127.0.0.4")
        # Several renewal cycles see the open session and bring nothing back.
        cycles = site.sessions.wait_for_cycles(4, timeout=10)
        assert all(cycle["event"] == "sessions_renewed" for cycle in cycles)
        assert cycles[-1]["sessions"] >= 1
        assert cycles[-1]["renewed"] == 0
        assert cycles[-1]["not_found"] >= 1
        assert_refused(site.postfix, "127.0.0.4")
        assert site.dovecot_popauth.ask("QUERY 127.0.0.4") == ["NOTFOUND address=127.0.0.4"]
        # The next real login whitelists again, and renewals carry on from there.
        with ImapSession(imap_port(dovecot), "bob", USERS["bob"], "127.0.0.4"):
            assert relay_code(site.postfix, "127.0.0.4") == 250
            hold_and_check_relaying(site.postfix, "127.0.0.4", 1.5 * TTL)


def test_a_blocked_user_stays_blocked_while_the_session_lasts(
    one_host: Site, dovecot: DovecotInstance
) -> None:
    site = one_host
    with ImapSession(imap_port(dovecot), "alice", USERS["alice"], "127.0.0.5"):
        assert relay_code(site.postfix, "127.0.0.5") == 250
        block = site.dovecot_popauth.cli("block", "alice")
        assert block.returncode == 0, block
        try:
            cycles = site.sessions.wait_for_cycles(4, timeout=10)
            assert cycles[-1]["blocked"] >= 1
            assert cycles[-1]["renewed"] == 0
            assert_refused(site.postfix, "127.0.0.5")
        finally:
            site.dovecot_popauth.cli("unblock", "alice")
        # Unblocking lifts the refusal of logins but brings back no entry.
        site.sessions.wait_for_cycles(2, timeout=10)
        assert_refused(site.postfix, "127.0.0.5")


# --- Dovecot and the MTA on different hosts, sharing one Redis ----------------


@pytest.fixture(scope="module")
def redis_server(live_root: Path) -> Iterator[RedisInstance]:
    with RedisInstance(root=live_root / "sessions-redis", port=free_port()) as server:
        yield server


@pytest.fixture(scope="module")
def mta_host(live_root: Path) -> Iterator[PostfixInstance]:
    """A second host's Postfix, asking its own popauth (in ``mta-host/``)."""
    directory = live_root / "mta-host"
    directory.mkdir(mode=0o755)
    with PostfixInstance(
        root=directory / "postfix",
        smtp_port=free_port(),
        milter=f"unix:{directory / 'milter.sock'}",
        local_domain="local.test",
        extra_main_cf={"myhostname": "mta.local.test", "myorigin": "local.test"},
    ) as postfix:
        yield postfix


@pytest.fixture
def two_hosts(
    dovecot: DovecotInstance,
    mta_host: PostfixInstance,
    redis_server: RedisInstance,
    start_popauth: PopauthFactory,
    tmp_path: Path,
) -> Iterator[Site]:
    """The Dovecot host's popauth (hook and sessions) and the MTA host's, on one Redis."""
    redis_server.flush()
    shared: dict[str, Any] = {"store": "redis", "redis_url": redis_server.url, "ttl": TTL}
    dovecot_side = start_popauth(**shared)
    mta_directory = mta_host.root.parent
    with (
        PopauthServer(mta_directory, **LIVE_SETTINGS, **shared) as mta_side,
        SessionsProcess(
            directory=tmp_path / "sessions",
            dovecot=dovecot,
            ingest_socket=dovecot_side.ingest_path,
            ttl=TTL,
            interval=INTERVAL,
        ) as sessions,
    ):
        yield Site(mta_host, mta_side, dovecot_side, sessions)


def test_sessions_renew_through_redis_for_another_host(
    two_hosts: Site, dovecot: DovecotInstance
) -> None:
    site = two_hosts
    with ImapSession(imap_port(dovecot), "alice", USERS["alice"], "127.0.0.6") as session:
        assert relay_code(site.postfix, "127.0.0.6") == 250
        hold_and_check_relaying(site.postfix, "127.0.0.6", 2.5 * TTL)
        # The MTA host's popauth decided, from the entry the other host renewed.
        decisions = site.mta_popauth.events("relay_decision")
        assert decisions[-1]["reason"] == "whitelisted"
        assert site.dovecot_popauth.events("relay_decision") == []
        session.logout()
    refused_after = seconds_until_refused(site.postfix, "127.0.0.6", limit=3 * TTL)
    assert refused_after <= TTL + INTERVAL + LATENESS, refused_after


def test_a_revoke_on_the_mta_host_wins_over_renewals(
    two_hosts: Site, dovecot: DovecotInstance
) -> None:
    site = two_hosts
    with ImapSession(imap_port(dovecot), "bob", USERS["bob"], "127.0.0.7"):
        assert relay_code(site.postfix, "127.0.0.7") == 250
        assert site.mta_popauth.cli("revoke", "127.0.0.7").returncode == 0
        cycles = site.sessions.wait_for_cycles(4, timeout=10)
        assert cycles[-1]["event"] == "sessions_renewed"
        assert cycles[-1]["renewed"] == 0
        assert_refused(site.postfix, "127.0.0.7")


# --- a cycle of many sessions against real Redis: the batch path ---------------

SESSIONS = 1_234  # more than two batches of wire.RENEW_BATCH


SCRIPT_COMMANDS = ("eval", "evalsha")


def session_address(n: int) -> str:
    return f"10.77.{n // 250}.{n % 250 + 1}"


def session_user(n: int) -> str:
    # Every hundredth user is spelt in capitals, to be blocked caselessly.
    return f"User{n}" if n % 100 == 7 else f"user{n}"


def script_calls(client: redis.Redis) -> int:
    """How many Lua script calls Redis has run (EVAL and EVALSHA)."""
    stats: dict[str, Any] = client.info("commandstats")
    return sum(
        int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("eval", "evalsha")
    )


def test_a_cycle_of_many_sessions_is_renewed_in_batches_through_redis(
    redis_server: RedisInstance, start_popauth: PopauthFactory
) -> None:
    redis_server.flush()
    popauth = start_popauth(store="redis", redis_url=redis_server.url, ttl=900)
    client = IngestClient(str(popauth.ingest_path), timeout=60)
    logins = [f"LOGIN {session_address(n)} {session_user(n)}" for n in range(SESSIONS)]
    assert all(reply.startswith("OK ") for reply in client.request_many(logins, window=500))
    # Users blocked straight in Redis's block list (no revoke: their entries
    # stay), by their caseless names; and an address where another user
    # logged in and then this session's user was revoked: only the other's.
    blocked = {n for n in range(SESSIONS) if n % 100 == 7}
    with redis.Redis(port=redis_server.port, socket_timeout=5) as direct:
        for n in blocked:
            direct.sadd("popauth:blocked-users", f"user{n}")
        assert client.request_many([f"LOGIN {session_address(5)} mallory"]) != []
        assert client.request_many([f"REVOKEUSER {session_user(5)}"])[0].startswith("OK ")
        # Every entry about to expire: a renewal is seen in its new expiry.
        for n in range(SESSIONS):
            direct.expire(f"popauth:{session_address(n)}", 30)
        direct.config_resetstat()
        sessions = [Session(session_address(n), session_user(n)) for n in range(SESSIONS)]
        sessions.append(Session("10.77.250.250", "nobody-here"))
        counts = renew_sessions(client, sessions)
        calls = script_calls(direct)
        expiries = {n: direct.ttl(f"popauth:{session_address(n)}") for n in range(SESSIONS)}
        stored = {n: direct.hgetall(f"popauth:{session_address(n)}") for n in (5, 6)}
        assert direct.exists("popauth:10.77.250.250") == 0  # never created
    assert counts == RenewalCounts(
        renewed=SESSIONS - len(blocked) - 1, not_found=2, blocked=len(blocked)
    )
    # A few script calls for the whole cycle, not one per session.
    assert 3 <= calls <= 12, calls
    for n, ttl in expiries.items():
        if n in blocked or n == 5:
            assert 0 < ttl <= 30, (n, ttl)  # left alone
        else:
            assert ttl > 800, (n, ttl)  # extended by a full ttl
    assert list(stored[5]) == [b"mallory"]  # the other user's membership, left alone
    assert list(stored[6]) == [session_user(6).encode()]


def test_a_block_wins_over_batches_of_renewals_in_flight(
    redis_server: RedisInstance, start_popauth: PopauthFactory
) -> None:
    redis_server.flush()
    popauth = start_popauth(store="redis", redis_url=redis_server.url, ttl=900)
    client = IngestClient(str(popauth.ingest_path), timeout=60)
    sessions = [Session(session_address(n), "idler") for n in range(600)]
    logins = [f"LOGIN {session.address} idler" for session in sessions]
    assert all(reply.startswith("OK ") for reply in client.request_many(logins, window=500))
    renewing = threading.Event()
    stop = threading.Event()
    outcomes: list[RenewalCounts] = []

    def renew_until_stopped() -> None:
        while not stop.is_set():
            outcomes.append(renew_sessions(IngestClient(str(popauth.ingest_path), 60), sessions))
            renewing.set()

    worker = threading.Thread(target=renew_until_stopped, daemon=True)
    worker.start()
    try:
        assert renewing.wait(30)
        block = popauth.ask("BLOCK idler")[0]
        assert block.startswith("OK user=idler revoked="), block
        # Whatever the cycle in flight did, no entry of the blocked user is left.
        with redis.Redis(port=redis_server.port, socket_timeout=5) as direct:
            left = [s.address for s in sessions if direct.exists(f"popauth:{s.address}")]
        assert left == []
        after = renew_sessions(client, sessions)
        assert after == RenewalCounts(blocked=len(sessions))
    finally:
        stop.set()
        worker.join(60)
    assert not worker.is_alive()
    assert all(counts.errors == 0 for counts in outcomes)
