"""The store contract (tests/support/store_contract.py) on a real redis-server.

The same tests run on the memory store in tests/unit/test_store_contract.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.ports import free_port
from harness.redis import RedisInstance
from popauth.store import MAX_USERS_PER_ADDRESS, WhitelistStore
from popauth.store.accounts import RedisBlockList
from popauth.store.redis import RedisStore, connect
from tests.support.clock import FakeClock
from tests.support.store_contract import *  # noqa: F403 - the contract's tests run here
from tests.support.store_contract import Factory, Subject


@pytest.fixture
def make_subject(tmp_path: Path) -> Iterator[Factory]:
    with RedisInstance(root=tmp_path / "redis", port=free_port()) as server:

        def outlive(store: WhitelistStore) -> None:
            # Redis expires keys on its own clock: wait until it has, within bounds.
            deadline = time.monotonic() + 10
            while store.entries() and time.monotonic() < deadline:
                time.sleep(0.05)

        def cut_off() -> bool:
            server.stop()
            return True

        def make(ttl: int, max_users: int = MAX_USERS_PER_ADDRESS) -> Subject:
            # A clock of its own, near the real one: the members' expiry is
            # read on the store's clock, so a test moves it (advance) without
            # waiting. ``outlive`` also waits for Redis to drop the keys.
            clock = FakeClock(wall=time.time())
            store = RedisStore(
                client=connect(server.url, 0.5),
                ttl=ttl,
                key_prefix="popauth:",
                clock=clock,
                max_users_per_address=max_users,
            )
            blocklist = RedisBlockList(store.client, store.blocklist_key)
            return Subject(store, blocklist, ttl, lambda: outlive(store), clock.advance, cut_off)

        yield make
