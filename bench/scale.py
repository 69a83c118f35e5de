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
import math
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import snapshot_latency
from bench.common import REPO, BenchResult, Check, Mode, percentile

FIRST = ["anna", "ben", "carla", "dieter", "emma", "felix", "greta", "hans", "ines", "jonas"]
LAST = ["meier", "schmidt", "schneider", "fischer", "weber", "wagner", "becker", "hoffmann"]
BASE = int(ipaddress.IPv4Address("10.0.0.0"))
LOCALITY = (("consecutive", "consecutive addresses"), ("hot", "100 hot addresses"))


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
    from popauth.basics.clock import SystemClock
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
    # The same number of lookups with better locality: consecutive
    # addresses (their entries were allocated one after the other, and an
    # int's hash is itself, so they share cache lines and pages in every
    # table), and 100 addresses picked at random, looked up over and over
    # (their memory stays in the CPU caches). If these keep the small
    # store's rate while the spread-out lookups do not, the big store's loss
    # is cache and TLB misses, not the tables' size or layout. The kinds
    # take turns, batch by batch, so that load from other processes hits
    # them alike; five batches each, the median batch rate shrugs off a
    # burst of such load.
    batch = max(1, lookups // 5)
    kinds = {
        "spread": [wanted[n % len(wanted)] for n in range(batch)],
        "consecutive": [ipaddress.IPv4Address(BASE + n % size) for n in range(batch)],
        "hot": [wanted[n % 100] for n in range(batch)],
    }
    rates: dict[str, list[float]] = {kind: [] for kind in kinds}
    hits = 0
    for _ in range(5):
        for kind, addresses in kinds.items():
            started = time.perf_counter()
            for address in addresses:
                if store.lookup(address) is not None:
                    hits += 1
            rates[kind].append(batch / (time.perf_counter() - started))
    if hits != batch * 5 * len(kinds):
        raise RuntimeError(f"only {hits} of {batch * 5 * len(kinds)} lookups hit")
    locality = {kind: statistics.median(values) for kind, values in rates.items()}
    spread_over_consecutive = statistics.median(
        spread / near for spread, near in zip(rates["spread"], rates["consecutive"], strict=True)
    )
    return {
        "size": size,
        "rss_before": before,
        "rss_after": after,
        "bytes_per_entry": (after - before) / size,
        "fill_per_second": size / fill_seconds,
        "lookups_per_second": locality["spread"],
        "lookups_per_second_consecutive": locality["consecutive"],
        "lookups_per_second_hot": locality["hot"],
        "spread_over_consecutive": spread_over_consecutive,
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


def other_cachetools() -> list[Path]:
    """Other cachetools releases to break the memory down for: directories
    (``pip install --target DIR cachetools==X``) in POPAUTH_BENCH_CACHETOOLS,
    separated by colons."""
    listed = os.environ.get("POPAUTH_BENCH_CACHETOOLS", "")
    return [Path(entry) for entry in listed.split(":") if entry]


def breakdown(size: int, cachetools_dir: Path | None) -> dict[str, Any]:
    environment = dict(os.environ)
    if cachetools_dir is not None:
        environment["PYTHONPATH"] = os.pathsep.join(
            [str(cachetools_dir), *filter(None, [environment.get("PYTHONPATH")])]
        )
    completed = subprocess.run(
        [sys.executable, "-m", "bench.memory_breakdown", str(size)],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"memory breakdown failed:\n{completed.stderr}")
    outcome: dict[str, Any] = json.loads(completed.stdout)
    return outcome


def run(mode: Mode, workdir: Path) -> BenchResult:
    result = BenchResult("B5", "scale: whitelist memory and lookup rate (MemoryStore)")
    # The smoke run stops at 10^5: filling 10^6 takes about 8 s per repeat.
    sizes = (1_000, 10_000, 100_000) if mode.quick else (1_000, 10_000, 100_000, 1_000_000)
    lookups = 100_000 if mode.quick else 300_000
    repeats = 1 if mode.quick else 3
    top, bottom = label(sizes[-1]), label(sizes[0])
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
            if size in (sizes[0], sizes[-1]):
                for key, how in LOCALITY:
                    result.metric(f"lookups/s at {name}, {how}", "lookups/s").samples.append(
                        outcome[f"lookups_per_second_{key}"]
                    )
                result.metric(
                    f"lookup rate at {name}, spread / consecutive (same store)", "ratio"
                ).samples.append(outcome["spread_over_consecutive"])
        shared = measure(sizes[-1], 1000, shared_user=True)
        result.metric(f"bytes/entry at {top}, one user name", "B").samples.append(
            shared["bytes_per_entry"]
        )
    for cachetools_dir in [None, *other_cachetools()]:
        parts = breakdown(sizes[-1], cachetools_dir)
        release = f"cachetools {parts['cachetools']}"
        for component, value in parts["bytes_per_entry"].items():
            name = f"bytes/entry at {top} (tracemalloc), {release}: {component}"
            result.metric(name, "B").samples.append(value)
    result.metrics.sort(key=lambda metric: metric.name.split(" at ")[0].split(" to ")[0])
    per_entry = result.metric(f"bytes/entry at {top}", "B").stats()
    ratio = result.ratio(
        f"lookup rate {top}/{bottom}", f"lookups/s at {top}", f"lookups/s at {bottom}"
    )
    for _, how in LOCALITY:
        result.ratio(
            f"lookup rate {top}/{bottom}, {how}",
            f"lookups/s at {top}, {how}",
            f"lookups/s at {bottom}, {how}",
        )
    latency_entries = 50_000 if mode.quick else 1_000_000
    latency = snapshot_latency.measure(
        workdir / "snapshots", latency_entries, 3.0 if mode.quick else 30.0
    )
    entries_label = f"{label(latency_entries)} entries"
    for name, samples in (
        (f"RCPT decision latency at {entries_label}, snapshot being written", latency.during),
        (f"RCPT decision latency at {entries_label}, between snapshots", latency.between),
    ):
        if samples:
            result.metric(name, "ms", show_p99=True).samples = samples
    if latency.snapshot_seconds:
        result.metric(f"snapshot save of {entries_label}", "s").samples = latency.snapshot_seconds
    during_p99 = percentile(latency.during, 0.99) if latency.during else math.inf
    result.checks += [
        Check(f"bytes/entry at {top}", per_entry.median, "<=", 300.0, "B"),
        Check(ratio.name, ratio.stats().median, ">=", 0.9),
        Check(
            f"RCPT decision p99 at {entries_label}, snapshot being written",
            during_p99,
            "<=",
            2.0,
            "ms",
        ),
    ]
    result.notes += [
        "RSS delta (VmRSS) around filling, in a fresh interpreter per size; at 10^3 the page "
        "granularity of RSS makes bytes/entry coarse",
        f"{lookups:,} lookups per size in 5 batches (median batch rate), of addresses spread "
        "over the whole store (all hits); 'consecutive' and '100 hot' look up as many "
        "with better locality, taking turns with them: where they keep the small store's rate, "
        "the loss is cache and TLB misses",
        "'one user name': every entry has the same user, so the difference is the cost "
        "of the user name strings",
        "tracemalloc rows: each component built alone (bench/memory_breakdown.py); more "
        "cachetools releases with POPAUTH_BENCH_CACHETOOLS=DIR[:DIR] (pip install --target DIR)",
        f"RCPT latency: a real popauth serve restored from a snapshot of {latency_entries:,} "
        "entries, saving one every second; the deciding exchange of one MTA session at a time "
        "(bench/snapshot_latency.py), sorted by the server's snapshot_saved events",
    ]
    return result


if __name__ == "__main__":
    print(json.dumps(child(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:] == ["shared"])))
