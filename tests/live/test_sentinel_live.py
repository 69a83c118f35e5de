"""Redis Sentinel: two popauth hosts behind real Postfix follow a failover.

A master, a replica and three sentinels run on loopback. Killing the master
must give relaying clients only 4xx replies while the sentinels fail over,
never a wrong 250 or a 550 for a whitelisted client, and relaying must come
back on its own, on both hosts, without restarting popauth.

The failover tests print what they measure (``-s`` shows it): the window
during which relaying tempfailed, and how many acknowledged logins the new
master does not have.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from harness.multihost import MtaHost
from harness.popauth import PopauthServer
from harness.ports import free_port
from harness.redis import RedisInstance, SentinelInstance
from tests.live.conftest import LIVE_SETTINGS

pytestmark = pytest.mark.live

SERVICE = "popauth-test"
SENTINEL_PASSWORD = "sentinel-secret"
FAILOVER_DEADLINE = 60.0


@dataclass
class Cluster:
    """A master, its replica and three sentinels that watch them."""

    root: Path
    master: RedisInstance
    replica: RedisInstance
    sentinels: list[SentinelInstance] = field(default_factory=list)

    @property
    def sentinel_addresses(self) -> list[str]:
        return [f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels]

    def master_port(self) -> int | None:
        """The master port the sentinels agree on, or None while they do not."""
        ports = set()
        for sentinel in self.sentinels:
            info = sentinel.master_info()
            if info is None or info.get("is_sdown") or info.get("is_odown"):
                return None
            ports.add(int(info["port"]))
        return ports.pop() if len(ports) == 1 else None

    def wait_ready(self) -> None:
        """Until every sentinel sees the replica and the two other sentinels,
        and the replica is in sync: only then can a failover happen."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            infos = [sentinel.master_info() for sentinel in self.sentinels]
            if (
                all(
                    info is not None
                    and info.get("num-slaves") == 1
                    and info.get("num-other-sentinels") == 2
                    for info in infos
                )
                and self.master.has_replica_in_sync()
            ):
                return
            time.sleep(0.1)
        raise AssertionError("the sentinels did not discover each other and the replica")

    def stop(self) -> None:
        for daemon in [*self.sentinels, self.replica, self.master]:
            daemon.stop()


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("sentinel")
    master = RedisInstance(root=root / "master", port=free_port())
    replica = RedisInstance(root=root / "replica", port=free_port(), replica_of=master.port)
    made = Cluster(root, master, replica)
    try:
        master.start()
        replica.start()
        for number in range(3):
            sentinel = SentinelInstance(
                root=root / f"sentinel-{number}",
                port=free_port(),
                master_port=master.port,
                service=SERVICE,
                password=SENTINEL_PASSWORD,
            )
            sentinel.start()
            made.sentinels.append(sentinel)
        made.wait_ready()
        yield made
    finally:
        made.stop()


def sentinel_settings(cluster: Cluster, **settings: Any) -> dict[str, Any]:
    return {
        **LIVE_SETTINGS,
        "store": "redis",
        # With sentinels only the URL's database and credentials count.
        "redis_url": "redis://ignored-with-sentinels:6379/0",
        "redis_sentinels": cluster.sentinel_addresses,
        "redis_sentinel_service": SERVICE,
        "redis_sentinel_password": SENTINEL_PASSWORD,
        "redis_timeout": 0.3,
        **settings,
    }


def start_popauth(hosts: list[MtaHost], cluster: Cluster, **settings: Any) -> None:
    for host in hosts:
        host.start_popauth(**sentinel_settings(cluster, **settings))


def replicated(cluster: Cluster) -> None:
    """Until the replica holds every write the master acknowledged so far."""
    with redis.Redis(port=cluster.master.port, socket_timeout=5) as client:
        assert client.wait(1, 3000) >= 1


def test_hosts_find_the_master_through_the_sentinels(
    cluster: Cluster, hosts: list[MtaHost]
) -> None:
    start_popauth(hosts, cluster)
    host_a, host_b = hosts
    assert host_a.login("127.0.0.2", "alice").startswith("OK ")
    assert host_b.relay("127.0.0.2")[0] == 250
    assert host_b.relay("127.0.0.3")[0] == 550
    # The entry is on the master the sentinels named, not anywhere else.
    with redis.Redis(port=cluster.master.port) as client:
        assert client.exists("popauth:127.0.0.2") == 1


def test_a_wrong_sentinel_password_fails_closed(cluster: Cluster, hosts: list[MtaHost]) -> None:
    start_popauth(hosts[:1], cluster, redis_sentinel_password="wrong")
    host = hosts[0]
    assert host.login("127.0.0.2", "alice").startswith("ERR unavailable")
    code, text = host.relay("127.0.0.2")
    assert (code, text.split(" ", 1)[0]) == (451, "4.3.0")


@dataclass
class Probe:
    """Relays from one client through one host, over and over, noting each reply."""

    host: MtaHost
    client: str
    replies: list[tuple[float, int, str]] = field(default_factory=list)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            code, text = self.host.relay(self.client)
            self.replies.append((time.monotonic(), code, text))


def failover_under_load(
    cluster: Cluster, hosts: list[MtaHost], *, wait_replicas: int
) -> tuple[float, int, int]:
    """Kill the master while both hosts relay and host A takes logins.

    Returns (window in seconds, acknowledged logins, of those lost).
    """
    start_popauth(hosts, cluster, redis_wait_replicas=wait_replicas, redis_wait_timeout=0.2)
    host_a, host_b = hosts
    whitelisted = ["127.0.0.10", "127.0.0.11"]
    for client in whitelisted:
        assert host_a.login(client, "alice").startswith("OK ")
    replicated(cluster)
    stop = threading.Event()
    probes = [Probe(host, client) for host in hosts for client in whitelisted]
    refused = [Probe(host, "127.0.0.99") for host in hosts]
    acknowledged: list[tuple[float, str]] = []

    def log_in() -> None:
        for number in range(1, 60_000):
            if stop.is_set():
                return
            client = f"127.1.{number // 250}.{number % 250 + 1}"
            reply = host_a.login(client, f"user{number}")
            if reply.startswith("OK "):
                acknowledged.append((time.monotonic(), client))

    threads = [threading.Thread(target=p.run, args=(stop,)) for p in [*probes, *refused]]
    threads.append(threading.Thread(target=log_in))
    for thread in threads:
        thread.start()
    try:
        while not all(probe.replies for probe in [*probes, *refused]) or len(acknowledged) < 20:
            time.sleep(0.01)
        killed_at = time.monotonic()
        cluster.master.kill()
        deadline = killed_at + FAILOVER_DEADLINE
        while time.monotonic() < deadline and not all(
            recovered(probe, killed_at) for probe in probes
        ):
            time.sleep(0.05)
    finally:
        stop.set()
        for thread in threads:
            thread.join()

    check_replies(probes, refused, killed_at)

    window = max(last_tempfail(probe, killed_at) for probe in probes) - killed_at
    before_kill = [client for at, client in acknowledged if at < killed_at]
    new_master = agreed_master(cluster, killed_at + FAILOVER_DEADLINE)
    assert new_master == cluster.replica.port
    with redis.Redis(port=new_master, socket_timeout=5) as client:
        present = client.exists(*(f"popauth:{c}" for c in before_kill))
    lost = len(before_kill) - present

    logins_work_again(cluster, hosts, wait_replicas)
    assert host_b.popauth is not None
    assert host_b.popauth.process is not None and host_b.popauth.process.poll() is None
    print(
        f"\nfailover (wait_replicas={wait_replicas}): relaying tempfailed for {window:.2f} s; "
        f"{lost} of {len(before_kill)} acknowledged logins lost"
    )
    return window, len(before_kill), lost


def check_replies(probes: list[Probe], refused: list[Probe], killed_at: float) -> None:
    for probe in probes:
        after = [(t, code, text) for t, code, text in probe.replies if t >= killed_at]
        codes = {code for _, code, _ in after}
        # Only a 250 or a tempfail, never a 550, for a client that is whitelisted.
        assert codes <= {250, 451}, (probe.client, sorted(codes))
        assert recovered(probe, killed_at), f"{probe.client} did not relay again"
    for probe in refused:
        assert 250 not in {code for _, code, _ in probe.replies}, probe.client


def logins_work_again(cluster: Cluster, hosts: list[MtaHost], wait_replicas: int) -> None:
    """After the failover the hosts work as before, without a restart."""
    host_a, host_b = hosts
    if wait_replicas:
        # Until a replica is back no login can be confirmed: refused, not lost.
        assert host_b.login("127.0.0.20", "carol").startswith("ERR unavailable")
        # The old master comes back; the sentinels make it the new replica.
        cluster.master.start()
        deadline = time.monotonic() + FAILOVER_DEADLINE
        while not host_b.login("127.0.0.20", "carol").startswith("OK "):
            assert time.monotonic() < deadline, "the old master did not rejoin as a replica"
            time.sleep(0.1)
    else:
        assert host_b.login("127.0.0.20", "carol").startswith("OK ")
    assert host_a.relay("127.0.0.20")[0] == 250


def agreed_master(cluster: Cluster, deadline: float) -> int | None:
    """The master port once every sentinel agrees on it: popauth may reach the
    new master through one sentinel while another still marks the old one down."""
    while (port := cluster.master_port()) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    return port


def recovered(probe: Probe, killed_at: float) -> bool:
    """The last three replies after the kill were 250, after at least one tempfail."""
    after = [code for t, code, _ in probe.replies if t >= killed_at]
    return 451 in after and after[-3:] == [250, 250, 250]


def last_tempfail(probe: Probe, killed_at: float) -> float:
    return max(t for t, code, _ in probe.replies if t >= killed_at and code == 451)


def test_failover_gives_tempfails_then_relays_again(cluster: Cluster, hosts: list[MtaHost]) -> None:
    window, acknowledged, lost = failover_under_load(cluster, hosts, wait_replicas=0)
    assert acknowledged >= 20
    assert 0 < window < FAILOVER_DEADLINE
    assert 0 <= lost <= acknowledged


def test_failover_with_wait_loses_no_acknowledged_login(
    cluster: Cluster, hosts: list[MtaHost]
) -> None:
    window, acknowledged, lost = failover_under_load(cluster, hosts, wait_replicas=1)
    assert 0 < window < FAILOVER_DEADLINE
    assert acknowledged >= 20
    assert lost == 0


def test_a_cut_off_replica_loses_logins_unless_they_wait(
    cluster: Cluster, hosts: list[MtaHost]
) -> None:
    """The replica is cut off while logins come in, then the master dies.

    Without WAIT the logins were acknowledged and are gone after the failover;
    with ``redis_wait_replicas = 1`` they were refused (the hook lets the POP
    login go on, the client is simply not whitelisted): nothing acknowledged
    is lost.
    """
    start_popauth(hosts, cluster)
    host_a, host_b = hosts
    careful_dir = host_a.directory / "waiting"
    careful_dir.mkdir(mode=0o755, exist_ok=True)
    careful = PopauthServer(
        careful_dir, **sentinel_settings(cluster, redis_wait_replicas=1, redis_wait_timeout=0.1)
    )
    with careful:
        replica_pid = cluster.replica.pid
        # Stopped, the replica cannot reconnect after the master drops it.
        os.kill(replica_pid, signal.SIGSTOP)
        try:
            with redis.Redis(port=cluster.master.port, socket_timeout=5) as client:
                # "slave": the one name for it that redis-py 4.3 to 8 all accept.
                assert client.client_kill_filter(_type="slave") == 1
            plain = [host_a.login(f"127.2.0.{n}", "dave") for n in range(1, 6)]
            waited = [careful.ask(f"LOGIN 127.3.0.{n} erin")[0] for n in range(1, 6)]
            cluster.master.kill()
        finally:
            os.kill(replica_pid, signal.SIGCONT)
    assert all(reply.startswith("OK ") for reply in plain), plain
    assert all(reply.startswith("ERR unavailable") for reply in waited), waited
    deadline = time.monotonic() + FAILOVER_DEADLINE
    while cluster.master_port() != cluster.replica.port:
        assert time.monotonic() < deadline, "no failover"
        time.sleep(0.1)
    with redis.Redis(port=cluster.replica.port, socket_timeout=5) as client:
        assert client.exists(*(f"popauth:127.2.0.{n}" for n in range(1, 6))) == 0
    # Five logins were acknowledged and are gone: those clients get 550 now.
    while (reply := host_b.relay("127.2.0.1"))[0] == 451:
        assert time.monotonic() < deadline
    assert reply[0] == 550


def wait_for_failover(cluster: Cluster) -> None:
    deadline = time.monotonic() + FAILOVER_DEADLINE
    while cluster.master_port() != cluster.replica.port:
        assert time.monotonic() < deadline, "no failover"
        time.sleep(0.1)


def relay_after_failover(host: MtaHost, client: str) -> int:
    """The first reply that is not a tempfail, once the hosts follow the new master."""
    deadline = time.monotonic() + FAILOVER_DEADLINE
    while (code := host.relay(client)[0]) == 451:
        assert time.monotonic() < deadline, f"{client} still tempfails"
        time.sleep(0.05)
    return code


ADMIN_CHANGES = ("BLOCK alice", "REVOKE 127.0.0.41", "REVOKEUSER carol", "UNBLOCK mallory")


def test_changes_no_replica_confirms_are_answered_as_such(
    cluster: Cluster, hosts: list[MtaHost]
) -> None:
    """With the replica cut off, a block, a revoke and an unblock are not
    acknowledged: each is answered ``ERR incomplete`` and says it is in force
    on the master only. The failover then undoes them, as the replies said;
    repeated once a replica is back, they are confirmed."""
    start_popauth(hosts, cluster, redis_wait_replicas=1, redis_wait_timeout=0.1)
    host_a, host_b = hosts
    assert host_a.popauth is not None
    for client, user in (("127.0.0.40", "alice"), ("127.0.0.41", "bob"), ("127.0.0.42", "carol")):
        assert host_a.login(client, user).startswith("OK ")
    assert host_a.popauth.ask("BLOCK mallory") == ["OK user=mallory revoked=0 blocked=new"]
    replicated(cluster)
    replica_pid = cluster.replica.pid
    os.kill(replica_pid, signal.SIGSTOP)
    try:
        with redis.Redis(port=cluster.master.port, socket_timeout=5) as client:
            assert client.client_kill_filter(_type="replica") == 1
        replies = {line: host_a.popauth.ask(line)[0] for line in ADMIN_CHANGES}
        # In force on the master all the same.
        assert [host_b.relay(f"127.0.0.{n}")[0] for n in (40, 41, 42)] == [550, 550, 550]
        assert host_b.login("127.0.0.43", "mallory").startswith("ERR unavailable ")
        cluster.master.kill()
    finally:
        os.kill(replica_pid, signal.SIGCONT)
    for line, reply in replies.items():
        verb = line.split()[0]
        assert reply == (
            f"ERR incomplete {verb} is in force on the Redis master, but only 0 of 1 replicas "
            "confirmed it: a failover may undo it; repeat it when the replicas are back"
        ), reply
    events = host_a.popauth.events("change_not_confirmed")
    assert [(e["verb"], e["state"]) for e in events] == [
        (line.split()[0], "in force on the master only") for line in ADMIN_CHANGES
    ]
    wait_for_failover(cluster)
    # As the replies warned: the new master never had these changes.
    assert relay_after_failover(host_b, "127.0.0.40") == 250
    assert [host_b.relay(f"127.0.0.{n}")[0] for n in (41, 42)] == [250, 250]
    assert host_b.login("127.0.0.43", "mallory").startswith("ERR blocked ")
    # Repeated while no replica is back: in force on the new master, still unconfirmed.
    assert host_a.popauth.ask("BLOCK alice")[0].startswith("ERR incomplete BLOCK ")
    assert host_b.relay("127.0.0.40")[0] == 550
    # The old master rejoins as a replica: the repeats are confirmed now.
    cluster.master.start()
    deadline = time.monotonic() + FAILOVER_DEADLINE
    while not (reply := host_a.popauth.ask("BLOCK alice")[0]).startswith("OK "):
        assert reply.startswith("ERR incomplete "), reply
        assert time.monotonic() < deadline, "the old master did not rejoin as a replica"
        time.sleep(0.1)
    assert reply == "OK user=alice revoked=0 blocked=already"
    assert host_a.popauth.ask("REVOKE 127.0.0.41")[0].startswith("OK address=127.0.0.41 user=bob")
    assert host_a.popauth.ask("REVOKEUSER carol") == ["OK user=carol revoked=1"]
    assert host_a.popauth.ask("UNBLOCK mallory") == ["OK user=mallory"]
    assert [host_b.relay(f"127.0.0.{n}")[0] for n in (40, 41, 42)] == [550, 550, 550]


def test_confirmed_changes_survive_a_failover(cluster: Cluster, hosts: list[MtaHost]) -> None:
    start_popauth(hosts, cluster, redis_wait_replicas=1, redis_wait_timeout=0.2)
    host_a, host_b = hosts
    assert host_a.popauth is not None
    for client, user in (("127.0.0.50", "alice"), ("127.0.0.51", "bob"), ("127.0.0.52", "carol")):
        assert host_a.login(client, user).startswith("OK ")
    assert host_a.popauth.ask("BLOCK Alice") == ["OK user=Alice revoked=1 blocked=new"]
    assert host_a.popauth.ask("REVOKE 127.0.0.51")[0].startswith("OK ")
    assert host_a.popauth.ask("REVOKEUSER carol") == ["OK user=carol revoked=1"]
    cluster.master.kill()
    wait_for_failover(cluster)
    assert relay_after_failover(host_b, "127.0.0.50") == 550
    assert [host_b.relay(f"127.0.0.{n}")[0] for n in (51, 52)] == [550, 550]
    assert host_b.login("127.0.0.50", "alice").startswith("ERR blocked ")
