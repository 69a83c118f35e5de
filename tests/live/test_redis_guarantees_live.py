"""What a Redis site promises, checked through ``popauth serve`` and a real redis-server.

- A BLOCK is never outlived by a LOGIN that was already in flight.
- popauth refuses a Redis that may evict the block list (``maxmemory-policy``).
- A ``redis_key_prefix`` with glob characters still finds its own entries.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis

from harness.popauth import PopauthServer
from harness.ports import free_port
from harness.redis import RedisInstance
from popauth.doors.ingest.client import IngestClient
from tests.support.milter_mta import CONTINUE, REPLY, Mta

pytestmark = pytest.mark.live

# The defect showed in 113 of 1,500 pairs: enough pairs to see it every time.
RACING_PAIRS = 1500
RACERS = 8


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisInstance]:
    with RedisInstance(root=tmp_path / "redis", port=free_port()) as server:
        yield server


def serve_with(redis_server: RedisInstance, directory: Path, **settings: Any) -> PopauthServer:
    directory.mkdir(mode=0o755, exist_ok=True)
    return PopauthServer(directory, store="redis", redis_url=redis_server.url, **settings)


def race_one_pair(client: IngestClient, number: int) -> tuple[str, str]:
    """LOGIN and BLOCK of one user, sent at the same moment; their replies."""
    address = f"10.{number // 250}.{number % 250}.1"
    user = f"racer{number}"
    start = threading.Barrier(2)
    login_reply: list[str] = []

    def log_in() -> None:
        start.wait()
        login_reply.extend(client.request(f"LOGIN {address} {user}"))

    login = threading.Thread(target=log_in)
    login.start()
    start.wait()
    block_reply = client.request(f"BLOCK {user}")
    login.join()
    return login_reply[0], block_reply[0]


def test_a_block_is_never_outlived_by_a_login_in_flight(
    redis_server: RedisInstance, tmp_path: Path
) -> None:
    """LOGIN and BLOCK of the same user at the same moment, 1,500 times.

    Whatever order they end up in, the user is blocked afterwards, so no
    entry of theirs may be left: either the LOGIN was refused, or the BLOCK
    revoked what it wrote.
    """
    with serve_with(redis_server, tmp_path / "popauth") as popauth:
        client = IngestClient(str(popauth.ingest_path), timeout=10)
        with ThreadPoolExecutor(RACERS) as racers:
            replies = list(racers.map(lambda n: race_one_pair(client, n), range(RACING_PAIRS)))
    assert all(login.startswith(("OK ", "ERR blocked ")) for login, _ in replies)
    assert all(block.startswith("OK ") for _, block in replies)
    with redis.Redis(port=redis_server.port) as direct:
        outlived = [key for key in direct.scan_iter(match="popauth:10.*") if direct.exists(key)]
    refused = sum(login.startswith("ERR blocked") for login, _ in replies)
    print(f"\n{RACING_PAIRS} pairs: {refused} logins refused, {len(outlived)} outlived the block")
    assert outlived == []


def test_block_and_revoke_by_user_with_glob_characters_in_the_prefix(
    redis_server: RedisInstance, tmp_path: Path
) -> None:
    with serve_with(redis_server, tmp_path / "popauth", redis_key_prefix="mail[1]:") as popauth:
        for address in ("192.0.2.1", "192.0.2.2"):
            assert popauth.ask(f"LOGIN {address} alice")[0].startswith("OK ")
        assert popauth.ask("REVOKEUSER alice") == ["OK user=alice revoked=2"]
        assert popauth.ask("QUERY 192.0.2.1")[0].startswith("NOTFOUND ")
        assert popauth.ask("LOGIN 192.0.2.1 Alice")[0].startswith("OK ")
        assert popauth.ask("BLOCK alice") == ["OK user=alice revoked=1 blocked=new"]
        assert popauth.ask("QUERY 192.0.2.1")[0].startswith("NOTFOUND ")
        assert popauth.ask("LOGIN 192.0.2.1 ALICE")[0] == "ERR blocked user ALICE is blocked"
    with redis.Redis(port=redis_server.port) as direct:
        assert direct.smembers("mail[1]:blocked-users") == {b"alice"}


# --- the eviction policy ------------------------------------------------------


def refused_at_start(popauth: PopauthServer) -> str:
    """popauth's exit status must be 2; what it said."""
    popauth.launch()
    assert popauth.process is not None
    try:
        status = popauth.process.wait(30)
    except subprocess.TimeoutExpired:
        status = None  # it started: the test fails below
    finally:
        popauth.stop()
    said = popauth.log_path.read_text()
    assert status == 2, said
    return said


@pytest.mark.parametrize("policy", ["allkeys-lru", "allkeys-lfu", "allkeys-random"])
def test_a_redis_that_may_evict_the_block_list_is_refused(tmp_path: Path, policy: str) -> None:
    options = ("--maxmemory-policy", policy)
    with RedisInstance(root=tmp_path / "redis", port=free_port(), options=options) as server:
        said = refused_at_start(serve_with(server, tmp_path / "popauth"))
    assert f"cannot start: Redis's maxmemory-policy is '{policy}'" in said, said
    assert "set maxmemory-policy to volatile-ttl" in said
    assert '"event": "redis_unsuitable"' in said


@pytest.mark.parametrize("policy", ["noeviction", "volatile-ttl", "volatile-lru"])
def test_a_redis_that_keeps_the_block_list_is_accepted(tmp_path: Path, policy: str) -> None:
    options = ("--maxmemory-policy", policy)
    with (
        RedisInstance(root=tmp_path / "redis", port=free_port(), options=options) as server,
        serve_with(server, tmp_path / "popauth") as popauth,
    ):
        assert popauth.ask("LOGIN 192.0.2.1 alice")[0].startswith("OK ")


def test_an_evicting_redis_found_after_start_refuses_logins(tmp_path: Path) -> None:
    """Redis was down when popauth started: the first login checks the policy,
    and logins are refused until it is safe."""
    server = RedisInstance(
        root=tmp_path / "redis", port=free_port(), options=("--maxmemory-policy", "allkeys-lru")
    )
    with serve_with(server, tmp_path / "popauth") as popauth:
        assert popauth.events("redis_unavailable_at_start")
        with server:
            assert popauth.ask("LOGIN 192.0.2.1 alice")[0].startswith("ERR unavailable ")
            (refused,) = popauth.events("ingest_store_unavailable")
            assert "maxmemory-policy is 'allkeys-lru'" in refused["error"]
            # Blocks still work: tightening is always safe.
            assert popauth.ask("BLOCK mallory")[0].startswith("OK ")
            with redis.Redis(port=server.port) as direct:
                direct.config_set("maxmemory-policy", "volatile-ttl")
            assert popauth.ask("LOGIN 192.0.2.1 alice")[0].startswith("OK ")
            assert popauth.ask("LOGIN 192.0.2.2 mallory")[0].startswith("ERR blocked ")


# --- a Redis user limited by ACL ----------------------------------------------

# What popauth runs, as docs/design.rst gives it to operators.
ACL_COMMANDS = (
    "+get +set +del +getdel +mget +scan +incrby +sadd +srem +sismember +smismember "
    "+smembers +type +hset +hdel +hgetall +hvals +pexpire +hget +hincrby +hsetnx +pttl "
    "+eval +evalsha +script|load +wait +ping +info"
)


def redis_with_user(root: Path, commands: str) -> RedisInstance:
    server = RedisInstance(root=root, port=free_port())
    server.start()
    with redis.Redis(port=server.port) as direct:
        direct.execute_command(
            "ACL", "SETUSER", "popauth", "on", ">secret", "resetkeys", "~popauth:*",
            "resetchannels", "-@all", *commands.split(),
        )  # fmt: skip
    return server


def test_the_documented_acl_is_enough(tmp_path: Path) -> None:
    design = (Path(__file__).parents[2] / "docs" / "design.rst").read_text()
    assert ACL_COMMANDS in " ".join(design.split())
    server = redis_with_user(tmp_path / "redis", ACL_COMMANDS)
    url = f"redis://popauth:secret@127.0.0.1:{server.port}/0"
    try:
        with PopauthServer(
            tmp_path, store="redis", redis_url=url, redis_wait_replicas=1, redis_timeout=1
        ) as popauth:
            # No replica: WAIT (allowed) confirms nothing, so logins are
            # undone and blocks are not confirmed, but nothing is forbidden.
            login = popauth.ask("LOGIN 192.0.2.1 alice")[0]
            assert login == "ERR unavailable 0 of 1 replicas confirmed it; undone, nothing changed"
            assert popauth.ask("BLOCK alice")[0].startswith("ERR incomplete BLOCK is in force")
        with PopauthServer(
            tmp_path, store="redis", redis_url=url, pop_first_max_recipients=1
        ) as popauth:
            for line, expected in (
                # The unconfirmed block above is in force all the same.
                ("LOGIN 192.0.2.1 alice", "ERR blocked "),
                ("UNBLOCK alice", "OK "),
                ("LOGIN 192.0.2.1 alice", "OK "),
                ("LOGIN 192.0.2.2 alice", "OK "),
                ("RENEW 192.0.2.1 alice", "OK "),
                ("QUERY 192.0.2.1", "OK "),
                ("LIST", "OK count=2"),
                ("STATS", "OK entries=2"),
                ("REVOKE 192.0.2.2", "OK "),
                ("REVOKEUSER alice", "OK user=alice revoked=1"),
                ("BLOCK bob", "OK "),
                ("BLOCKED", "OK count=1"),
            ):
                reply = popauth.ask(line)[0]
                assert reply.startswith(expected), (line, reply)
            # The relay budget's script: counted once, then refused (451 4.7.1).
            assert popauth.ask("LOGIN 192.0.2.5 carol")[0].startswith("OK ")
            session = Mta(popauth)
            session.connect("192.0.2.5")
            session.mail()
            assert session.rcpt("one@remote.example", "smtp")[0] == CONTINUE
            code, fields = session.rcpt("two@remote.example", "smtp")
            assert (code, fields["smtpcode"]) == (REPLY, "451"), fields
            session.close()
            assert " budget_left=0 budget_max=1 " in popauth.ask("QUERY 192.0.2.5")[0]
            assert not popauth.events("whitelist_unavailable")
            assert not popauth.events("ingest_store_unavailable")
    finally:
        server.stop()


def test_a_redis_user_that_cannot_read_the_policy_is_refused(tmp_path: Path) -> None:
    server = redis_with_user(tmp_path / "redis", ACL_COMMANDS.replace(" +info", ""))
    try:
        popauth = PopauthServer(
            tmp_path, store="redis", redis_url=f"redis://popauth:secret@127.0.0.1:{server.port}/0"
        )
        said = refused_at_start(popauth)
    finally:
        server.stop()
    assert "cannot read Redis's maxmemory-policy" in said, said
    assert "allow +info" in said


def test_min_replicas_to_write_refuses_changes_and_keeps_lookups(
    redis_server: RedisInstance, tmp_path: Path
) -> None:
    """Redis's own guard (docs/redis-sentinel.rst): with fewer good replicas
    than ``min-replicas-to-write`` the master refuses every write. popauth
    answers ``ERR unavailable``, nothing changes, and lookups go on."""
    with serve_with(redis_server, tmp_path / "popauth") as popauth:
        assert popauth.ask("LOGIN 192.0.2.1 alice")[0].startswith("OK ")
        with redis.Redis(port=redis_server.port) as direct:
            direct.config_set("min-replicas-to-write", 1)
            before = sorted(direct.keys("popauth:*"))
            for line in (
                "LOGIN 192.0.2.2 bob",
                "BLOCK alice",
                "UNBLOCK alice",
                "REVOKE 192.0.2.1",
                "REVOKEUSER alice",
                "RENEW 192.0.2.1 alice",
            ):
                assert popauth.ask(line) == ["ERR unavailable whitelist store unavailable"], line
            assert sorted(direct.keys("popauth:*")) == before
            assert popauth.ask("QUERY 192.0.2.1")[0].startswith("OK address=192.0.2.1 user=alice")
            errors = {event["error"] for event in popauth.events("ingest_store_unavailable")}
            assert all("NOREPLICAS" in error or "enough good replicas" in error for error in errors)
            direct.config_set("min-replicas-to-write", 0)
        assert popauth.ask("BLOCK alice") == ["OK user=alice revoked=1 blocked=new"]
