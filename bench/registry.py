"""Every benchmark, named for what it measures, in the order ``make bench`` runs them.

Each module's ``run(mode, workdir)`` measures one benchmark; the name here
is the one the runner, ``--only``, the results file and the performance
table use. ``old_key`` is what it was called before it had a name (B1-B8,
after the issue that asked for them; later ones go on counting, and it
names the benchmark's directory); ``--only`` still takes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import (
    follow,
    ingest,
    login_hook,
    milter_protocol,
    postfix_e2e,
    relay_budget,
    scale,
    sessions,
    soak,
)
from bench.common import BenchResult, Mode

Runner = Callable[[Mode, Path], BenchResult]


@dataclass(frozen=True)
class Benchmark:
    name: str
    run: Runner
    old_key: str
    # What it measures, for --help and the documentation.
    measures: str


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark(
        "milter-throughput",
        milter_protocol.run,
        "B1",
        "milter decisions/s over the milter socket, popauth against a no-op pymilter milter",
    ),
    Benchmark(
        "relay-budget-cost",
        relay_budget.run,
        "B9",
        'POP-first sessions/s: pop_first_sender "own" with the relay budget, against "any" without',
    ),
    Benchmark(
        "postfix-throughput",
        postfix_e2e.run,
        "B2",
        "messages/s through a real Postfix: popauth milter, socketmap, cidr table, no milter",
    ),
    Benchmark(
        "login-hook-latency",
        login_hook.run,
        "B3",
        "what the Dovecot post-login hook adds to a POP3 login, and relaying right after it",
    ),
    Benchmark("ingest-rate", ingest.run, "B4", "LOGIN requests/s over the ingest socket"),
    Benchmark(
        "memory-per-entry",
        scale.run,
        "B5",
        "whitelist memory per entry and lookup rate up to 10^6 entries",
    ),
    Benchmark(
        "session-renewals",
        sessions.run,
        "B6",
        "one popauth sessions renewal cycle at 10,000 and 100,000 open sessions",
    ),
    Benchmark(
        "follow-rate",
        follow.run,
        "B7",
        "popauth follow: login lines/s, cost per line, login-to-RCPT latency",
    ),
    Benchmark(
        "soak",
        soak.run,
        "B8",
        "minutes of SMTP sessions while logins, revokes and blocks churn, judged by an oracle",
    ),
)

NAMES: tuple[str, ...] = tuple(benchmark.name for benchmark in BENCHMARKS)


def find(key: str) -> Benchmark | None:
    """The benchmark called ``key`` (its name, or its old key in any case)."""
    for benchmark in BENCHMARKS:
        if key == benchmark.name or key.upper() == benchmark.old_key:
            return benchmark
    return None
