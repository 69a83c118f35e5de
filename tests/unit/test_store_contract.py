"""The store contract (tests/support/store_contract.py) on the memory store.

The same tests run on Redis in tests/live/test_store_contract_redis.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from popauth.store import MAX_USERS_PER_ADDRESS
from popauth.store.accounts import FileBlockList
from popauth.store.memory import MemoryStore
from tests.support.clock import FakeClock
from tests.support.store_contract import *  # noqa: F403 - the contract's tests run here
from tests.support.store_contract import Factory, Subject


@pytest.fixture
def make_subject() -> Iterator[Factory]:
    def make(ttl: int, max_users: int = MAX_USERS_PER_ADDRESS) -> Subject:
        clock = FakeClock()
        blocklist = FileBlockList(None)
        store = MemoryStore(
            ttl=ttl,
            max_entries=1000,
            clock=clock,
            is_blocked=blocklist.__contains__,
            max_users_per_address=max_users,
        )
        return Subject(
            store, blocklist, ttl, lambda: clock.advance(ttl + 1), clock.advance, lambda: False
        )

    yield make
