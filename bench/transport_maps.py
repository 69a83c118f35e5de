"""``python -m bench.transport_maps [--entries N] [--rounds R] [--source DIR]``.

What learning local delivery costs with a huge ``transport_maps`` table: a
private Postfix configuration (no daemon) whose ``hash:`` table holds N
routes for remote domains plus one for an address of a local domain. Each
round learns in a fresh interpreter (as ``popauth serve`` does at start and
on SIGHUP) and reports its wall time and the peak resident memory of that
interpreter. ``--source`` runs another checkout's code (its ``milter``
directory goes first on PYTHONPATH), to compare before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import REPO

LEARN = """
import json, resource, sys, time
from popauth.config import settings_from_mapping
from popauth.localdelivery.resolve import resolve_local_delivery
settings = settings_from_mapping({"postfix_config_directory": sys.argv[1]}).local
started = time.perf_counter()
local = resolve_local_delivery(settings)
elapsed = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
mailers = [m for m, _ in local.mailers]
print(json.dumps({"seconds": elapsed, "peak_bytes": peak, "mailers": mailers}))
"""


def write_layout(directory: Path, entries: int) -> None:
    lines = (
        f"user{n}@customer{n % 5000}.example smtp:[relay{n % 7}.example]\n" for n in range(entries)
    )
    with (directory / "transport").open("w") as table:
        table.writelines(lines)
        table.write("legacy@example.test smtp:[192.0.2.10]\n")
    (directory / "main.cf").write_text(
        "compatibility_level = 3.6\n"
        "myhostname = mx.example.test\n"
        "mydestination = $myhostname, example.test, localhost\n"
        "relay_domains = !customer.backup.test, backup.test\n"
        f"transport_maps = hash:{directory}/transport\n"
    )
    (directory / "master.cf").write_text("")
    subprocess.run(["postmap", "-c", str(directory), f"hash:{directory}/transport"], check=True)
    # Postfix waits for files whose mtime is not yet in the past.
    past = time.time() - 10
    for name in ("main.cf", "transport", "transport.db"):
        os.utime(directory / name, (past, past))


def learn_once(directory: Path, source: Path) -> dict[str, float]:
    environment = {**os.environ, "PYTHONPATH": str(source / "milter")}
    completed = subprocess.run(
        [sys.executable, "-c", LEARN, str(directory)],
        capture_output=True,
        text=True,
        env=environment,
        check=True,
        timeout=600,
    )
    result: dict[str, float] = json.loads(completed.stdout)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.transport_maps", description=__doc__)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--source", type=Path, default=REPO, help="checkout whose code learns")
    arguments = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="popauth-bench-transport-") as name:
        directory = Path(name)
        write_layout(directory, arguments.entries)
        results = [learn_once(directory, arguments.source) for _ in range(arguments.rounds)]
    seconds = [r["seconds"] for r in results]
    peaks = [r["peak_bytes"] / (1 << 20) for r in results]
    load = os.getloadavg()[0]
    print(f"source {arguments.source}, {arguments.entries} entries, load {load:.1f}")
    print(
        f"learning: median {statistics.median(seconds):.2f} s"
        f" (min {min(seconds):.2f}, max {max(seconds):.2f});"
        f" peak RSS median {statistics.median(peaks):.0f} MiB (max {max(peaks):.0f})"
    )
    print(f"mailers learned: {results[0]['mailers']}")
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"largest child process (postmap included): {children:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
