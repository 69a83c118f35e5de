"""B5: memory per whitelisted entry and lookup rate as the whitelist grows.

Each size is measured in a fresh interpreter (``python -m bench.scale N
LOOKUPS``) so that no earlier allocation hides in the numbers: it builds the
product's ``MemoryStore``, reads ``VmRSS`` from ``/proc/self/status``, fills
the store with N distinct IPv4 addresses and realistic user names (one name
per two addresses: people with a phone and a laptop, 8 to 20 characters, as
the ingest endpoint would hand them over: fresh strings), reads ``VmRSS``
again, and times ``lookup()`` of addresses spread over the whole store.
Sizes run in turn inside each round, so the rate ratio compares runs made
side by side.
"""

from __future__ import annotations

import ipaddress
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, BenchResult, Check, Mode

FIRST = ["anna", "ben", "carla", "dieter", "emma", "felix", "greta", "hans", "ines", "jonas"]
LAST = ["meier", "schmidt", "schneider", "fischer", "weber", "wagner", "becker", "hoffmann"]
BASE = int(ipaddress.IPv4Address("10.0.0.0"))


def user_name(index: int) -> str:
    first = FIRST[index % len(FIRST)]
    last = LAST[index // len(FIRST) % len(LAST)]
    return f"{first}.{last}{index // (len(FIRST) * len(LAST))}"


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def child(size: int, lookups: int, shared_user: bool) -> dict[str, Any]:
    from popauth.clock import SystemClock
    from popauth.store.memory import MemoryStore

    store = MemoryStore(ttl=900, max_entries=size, clock=SystemClock())
    # Warm the code paths (and allocate their caches) before the baseline.
    probe = ipaddress.IPv4Address(BASE - 1)
    store.grant(probe, "warm.up")
    store.lookup(probe)
    store.revoke(probe)
    # The addresses to look up are made before the baseline too: they are
    # the harness's, not the store's.
    rng = random.Random(size)
    wanted = [
        ipaddress.IPv4Address(BASE + rng.randrange(size)) for _ in range(min(lookups, 100_000))
    ]
    before = rss_bytes()
    started = time.perf_counter()
    for index in range(size):
        # "".join makes a fresh string as a decoded request line would.
        user = "anna.meier" if shared_user else user_name(index // 2)
        store.grant(ipaddress.IPv4Address(BASE + index), user)
    fill_seconds = time.perf_counter() - started
    after = rss_bytes()
    # Five batches; the median batch rate shrugs off a burst of load from
    # other processes on the machine.
    hits = 0
    batch = max(1, lookups // 5)
    rates = []
    for first in range(0, batch * 5, batch):
        started = time.perf_counter()
        for index in range(first, first + batch):
            if store.lookup(wanted[index % len(wanted)]) is not None:
                hits += 1
        rates.append(batch / (time.perf_counter() - started))
    if hits != batch * 5:
        raise RuntimeError(f"only {hits} of {batch * 5} lookups hit")
    return {
        "size": size,
        "rss_before": before,
        "rss_after": after,
        "bytes_per_entry": (after - before) / size,
        "fill_per_second": size / fill_seconds,
        "lookups_per_second": statistics.median(rates),
    }


def measure(size: int, lookups: int, shared_user: bool = False) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.scale", str(size), str(lookups)]
    completed = subprocess.run(
        [*command, "shared"] if shared_user else command,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"scale child {size} failed:\n{completed.stderr}")
    outcome: dict[str, Any] = json.loads(completed.stdout)
    return outcome


def label(size: int) -> str:
    return f"10^{len(str(size)) - 1}"


def run(mode: Mode, workdir: Path) -> BenchResult:
    result = BenchResult("B5", "scale: whitelist memory and lookup rate (MemoryStore)")
    # The smoke run stops at 10^5: filling 10^6 takes about 8 s per repeat.
    sizes = (1_000, 10_000, 100_000) if mode.quick else (1_000, 10_000, 100_000, 1_000_000)
    lookups = 100_000 if mode.quick else 300_000
    repeats = 1 if mode.quick else 3
    for index in range(repeats):
        order = sizes if index % 2 == 0 else tuple(reversed(sizes))
        for size in order:
            outcome = measure(size, lookups)
            name = label(size)
            result.metric(f"bytes/entry at {name}", "B").samples.append(outcome["bytes_per_entry"])
            result.metric(f"lookups/s at {name}", "lookups/s").samples.append(
                outcome["lookups_per_second"]
            )
            result.metric(f"grants/s filling to {name}", "grants/s").samples.append(
                outcome["fill_per_second"]
            )
        shared = measure(sizes[-1], 1000, shared_user=True)
        result.metric(f"bytes/entry at {label(sizes[-1])}, one user name", "B").samples.append(
            shared["bytes_per_entry"]
        )
    result.metrics.sort(key=lambda metric: metric.name.split(" at ")[0].split(" to ")[0])
    top, bottom = label(sizes[-1]), label(sizes[0])
    per_entry = result.metric(f"bytes/entry at {top}", "B").stats()
    ratio = result.ratio(
        f"lookup rate {top}/{bottom}", f"lookups/s at {top}", f"lookups/s at {bottom}"
    )
    result.checks += [
        Check(f"bytes/entry at {top}", per_entry.median, "<=", 300.0, "B"),
        Check(ratio.name, ratio.stats().median, ">=", 0.9),
    ]
    result.notes += [
        "RSS delta (VmRSS) around filling, in a fresh interpreter per size; at 10^3 the page "
        "granularity of RSS makes bytes/entry coarse",
        f"{lookups:,} lookups per size in 5 batches (median batch rate), of addresses spread "
        "over the whole store (all hits)",
        "'one user name': every entry has the same user, so the difference is the cost "
        "of the user name strings",
    ]
    return result


if __name__ == "__main__":
    print(json.dumps(child(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:] == ["shared"])))
