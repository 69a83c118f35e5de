"""What a Redis site promises, checked through ``popauth serve`` and a real redis-server.

- A BLOCK is never outlived by a LOGIN that was already in flight.
- popauth refuses a Redis that may evict the block list (``maxmemory-policy``).
- A ``redis_key_prefix`` with glob characters still finds its own entries.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis

from popauth.client import IngestClient
from tests.live.ports import free_port
from tests.live.redis import RedisInstance
from tests.support.popauth_server import PopauthServer

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
        outlived = [key for key in direct.scan_iter(match="popauth:10.*") if direct.get(key)]
    refused = sum(login.startswith("ERR blocked") for login, _ in replies)
    print(f"\n{RACING_PAIRS} pairs: {refused} logins refused, {len(outlived)} outlived the block")
    assert outlived == []
