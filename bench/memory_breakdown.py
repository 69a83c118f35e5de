"""Part of B5: where the bytes of a whitelist entry go, component by component.

Run in a fresh interpreter per cachetools release (``python -m
bench.memory_breakdown N``, with another release first on ``PYTHONPATH`` to
measure that one). Each component is built on its own, N of them, and
measured with ``tracemalloc`` (what the allocator was asked for; RSS adds
the allocator's own overhead on top):

- the int keys (IPv4: 32 bytes each);
- a plain ``dict`` of N int keys, as ``Cache`` keeps its items;
- an ``OrderedDict`` of N int keys, as ``TTLCache`` keeps its LRU order;
- a whole ``TTLCache`` with one shared value (the two tables above, plus
  TTLCache's expiry link per key and that link's float);
- popauth's entry (``_Entry``: the expiry float with who logged in, the key
  and its two neighbours in login order);
- the user names, one per two entries, interned;
- the whole ``MemoryStore``, for comparison with the sum;
- a ``MemoryStore`` of as many users, four behind each address.
"""

from __future__ import annotations

import collections
import gc
import ipaddress
import json
import sys
import tracemalloc
from collections.abc import Callable
from typing import Any

import cachetools

BASE = int(ipaddress.IPv4Address("10.0.0.0"))


def allocated(build: Callable[[], Any]) -> tuple[int, Any]:
    """Bytes that ``build()`` allocated and still holds, and what it built."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    built = build()
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return after - before, built


def breakdown(size: int) -> dict[str, Any]:
    from bench.scale import user_name
    from popauth.basics.clock import SystemClock
    from popauth.store import memory

    keys = [BASE + n for n in range(size)]
    parts: dict[str, float] = {}
    list_bytes, _ = allocated(lambda: [None] * size)  # the harness's own lists

    def per_entry(name: str, build: Callable[[], Any], minus: float = 0.0) -> Any:
        total, built = allocated(build)
        parts[name] = (total - minus) / size
        return built

    per_entry("int key", lambda: [BASE + n for n in range(size)], list_bytes)
    per_entry("Cache dict slot", lambda: dict.fromkeys(keys))
    per_entry("TTLCache OrderedDict slot and node", lambda: collections.OrderedDict.fromkeys(keys))

    def ttl_cache() -> Any:
        cache: cachetools.TTLCache[int, None] = cachetools.TTLCache(size, 900)
        for key in keys:
            cache[key] = None
        return cache

    whole_cache = per_entry("TTLCache, all of it", ttl_cache)
    del whole_cache
    parts["TTLCache link and its float"] = (
        parts["TTLCache, all of it"]
        - parts["Cache dict slot"]
        - parts["TTLCache OrderedDict slot and node"]
    )

    def entries() -> list[Any]:
        made = []
        for key in keys:
            entry = memory._Entry(1.5 + key)
            entry.key, entry.user = key, "x"
            made.append(entry)
        return made

    per_entry("popauth entry (expiry float, user, key, two links)", entries, list_bytes)
    per_entry(
        "user name, one per two entries",
        lambda: [sys.intern(user_name(n // 2)) for n in range(size)],
        list_bytes,
    )

    def store() -> Any:
        built = memory.MemoryStore(ttl=900, max_entries=size, clock=SystemClock())
        for n in range(size):
            built.grant(ipaddress.IPv4Address(BASE + n), user_name(n // 2))
        return built

    per_entry("MemoryStore, all of it", store)

    # Several users behind one address: a quarter as many addresses, each
    # with four users (as many memberships as above), per address and per
    # membership.
    def shared_store() -> Any:
        built = memory.MemoryStore(ttl=900, max_entries=size, clock=SystemClock())
        for n in range(size):
            built.grant(ipaddress.IPv4Address(BASE + n // 4), user_name(n))
        return built

    per_entry("MemoryStore, 4 users per address, per user", shared_store)
    parts["MemoryStore, 4 users per address, per address"] = (
        parts["MemoryStore, 4 users per address, per user"] * 4
    )
    return {"cachetools": cachetools.__version__, "size": size, "bytes_per_entry": parts}


if __name__ == "__main__":
    print(json.dumps(breakdown(int(sys.argv[1]))))
