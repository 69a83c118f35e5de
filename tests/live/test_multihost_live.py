"""Two hosts, one Redis: a login on one relays through the other.

Each "host" is a popauth serve process with its own milter and ingest
sockets and a Postfix instance of its own (the ``hosts`` fixture, shared
with the Sentinel tests), all sharing one redis-server.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from harness.multihost import MtaHost
from harness.popauth import POPAUTH
from harness.ports import free_port
from harness.redis import RedisInstance
from harness.smtp import SmtpSession
from tests.live.conftest import LIVE_SETTINGS

pytestmark = pytest.mark.live


@pytest.fixture(scope="module")
def redis_server(live_root: Path) -> Iterator[RedisInstance]:
    with RedisInstance(root=live_root / "redis", port=free_port()) as server:
        yield server


@pytest.fixture
def cluster(redis_server: RedisInstance, hosts: list[MtaHost]) -> list[MtaHost]:
    redis_server.flush()
    for host in hosts:
        host.start_popauth(**LIVE_SETTINGS, store="redis", redis_url=redis_server.url)
    return hosts


def test_login_on_one_host_relays_through_the_other(cluster: list[MtaHost]) -> None:
    host_a, host_b = cluster
    assert host_a.popauth is not None
    assert host_a.popauth.ask("LOGIN 127.0.0.2 alice")[0].startswith("OK ")
    assert host_b.relay("127.0.0.2")[0] == 250
    assert host_a.relay("127.0.0.2")[0] == 250
    assert host_b.relay("127.0.0.3")[0] == 550


def test_two_hosts_share_one_relay_budget(
    redis_server: RedisInstance, hosts: list[MtaHost]
) -> None:
    """Three relayed recipients per window for an address, wherever it sends through."""
    redis_server.flush()
    for host in hosts:
        host.start_popauth(
            **LIVE_SETTINGS,
            store="redis",
            redis_url=redis_server.url,
            pop_first_max_recipients=3,
            pop_first_budget_window=3,
        )
    host_a, host_b = hosts
    assert host_a.login("127.0.0.2", "alice").startswith("OK ")
    assert [host.relay("127.0.0.2")[0] for host in (host_a, host_b, host_a)] == [250, 250, 250]
    for host in hosts:
        code, text = host.relay("127.0.0.2")
        assert (code, text.split(" ", 1)[0]) == (451, "4.7.1"), (host.name, text)
    # One warning for the address and window, from the host that found it spent first.
    assert host_a.popauth is not None
    assert host_b.popauth is not None
    assert len(host_a.popauth.events("relay_budget_spent")) == 1
    assert host_b.popauth.events("relay_budget_spent") == []
    queried = host_b.popauth.cli("query", "127.0.0.2", "--format", "raw").stdout
    assert " budget_left=0 budget_max=3 " in queried, queried
    # The window ends for both hosts at once (Redis expires it).
    time.sleep(3.2)
    assert host_b.relay("127.0.0.2")[0] == 250


def test_revoke_on_one_host_stops_relaying_through_the_other(cluster: list[MtaHost]) -> None:
    host_a, host_b = cluster
    assert host_a.popauth is not None
    assert host_b.popauth is not None
    host_a.popauth.ask("LOGIN 127.0.0.2 alice")
    assert host_a.relay("127.0.0.2")[0] == 250
    assert host_b.popauth.cli("revoke", "127.0.0.2").returncode == 0
    # No local cache: the very next lookup on host A sees the revoke.
    code, text = host_a.relay("127.0.0.2")
    assert (code, text.split(" ", 1)[0]) == (550, "5.7.1")


def test_redis_outage_means_tempfail_then_recovery(
    redis_server: RedisInstance, cluster: list[MtaHost]
) -> None:
    host_a, host_b = cluster
    assert host_a.popauth is not None
    host_a.popauth.ask("LOGIN 127.0.0.2 alice")
    redis_server.stop()
    try:
        for host in cluster:
            code, text = host.relay("127.0.0.2")
            assert code == 451, (code, text)
            assert text.startswith("4.3.0"), text
            # A local recipient needs no whitelist and still gets through.
            with SmtpSession(host.postfix.smtp_port, "127.0.0.2") as session:
                assert session.mail()[0] == 250
                assert session.rcpt("alice@local.test")[0] == 250
        assert host_a.popauth.ask("LOGIN 127.0.0.4 bob")[0].startswith("ERR unavailable")
        started = time.monotonic()
        hook = subprocess.run(
            [POPAUTH, "login", "--socket", str(host_a.popauth.ingest_path), "127.0.0.4", "bob"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        assert hook.returncode != 0
        assert "unavailable" in hook.stderr
        assert time.monotonic() - started < 3
        assert host_b.popauth is not None
        assert host_b.popauth.events("whitelist_unavailable")
    finally:
        redis_server.start()
    # Both recover on their own: no restart of popauth.
    assert host_a.popauth.ask("LOGIN 127.0.0.2 alice")[0].startswith("OK ")
    assert host_b.relay("127.0.0.2")[0] == 250


def test_a_campaign_turns_every_host_at_once_and_graduations_are_shared(
    redis_server: RedisInstance, hosts: list[MtaHost]
) -> None:
    """The date is settings and clock, the same on both hosts; a graduation
    in Redis refuses on both, and a reinstatement on one restores both."""
    redis_server.flush()
    at = int(time.time()) + 5
    campaign = {
        "pop_first": "warn",
        "pop_first_retire_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at)),
        "pop_first_exempt_users": ["bob"],
        "pop_first_graduate": True,
    }
    for host in hosts:
        host.start_popauth(**LIVE_SETTINGS, **campaign, store="redis", redis_url=redis_server.url)
    host_a, host_b = hosts
    assert host_a.login("127.0.0.2", "alice").startswith("OK ")
    assert host_a.login("127.0.0.8", "bob").startswith("OK ")
    assert host_a.login("127.0.0.9", "carol").startswith("OK ")
    for host in hosts:
        assert host.relay("127.0.0.2")[0] == 250
    # carol has relayed by SMTP AUTH somewhere: the record her host wrote.
    redis.Redis.from_url(redis_server.url).hset(
        "popauth:pop-first-graduates", "carol", f"{time.time():.3f} 0"
    )
    for host in hosts:
        code, text = host.relay("127.0.0.9")
        assert code == 550
        assert text.startswith("5.7.1 Relaying denied. Your mail program already uses SMTP"), text
    assert host_b.popauth is not None
    assert host_b.popauth.ask("REINSTATE carol")[0].startswith("OK user=carol graduated=")
    assert host_a.relay("127.0.0.9")[0] == 250
    assert time.time() < at, "the first part of the test took too long"
    time.sleep(max(0.0, at - time.time()) + 0.2)
    for host in hosts:
        code, text = host.relay("127.0.0.2")
        assert code == 550
        assert text.startswith("5.7.1 Relaying denied. POP before SMTP has been retired"), text
        assert host.relay("127.0.0.8")[0] == 250  # bob is exempt
