"""The relay budget's cost: popauth milters side by side on POP-first traffic only.

Every session is a whitelisted client sending, as its own user, to one
remote recipient (the sessions of the milter throughput benchmark,
:mod:`bench.milter_protocol`). Side by side in each round:

- ``any, no budget``: ``pop_first_sender = "any"`` and no relay budget:
  popauth accepts the message at MAIL (what sites ran before either);
- ``own, no budget``: the sender checked, still accepted at MAIL;
- ``own, budget``: the sender checked and a relay budget on (one too large
  to run out here): MAIL goes on, the RCPT is counted in the store and
  answered, one milter round trip more.

The ratio asked for is ``own, budget`` against ``any, no budget``; the
middle set-up tells the sender check's part from the budget's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import BenchResult, Check, Mode, drive, process_cpu_seconds, rounds
from bench.milter_protocol import (
    ACCEPT,
    CONTINUE,
    WHITELISTED_IPS,
    Script,
    Tally,
    macros,
    packet,
    pid_of,
    script,
    session,
    start_popauth,
)

SETUPS: dict[str, dict[str, Any]] = {
    "any, no budget": {"pop_first_sender": "any", "pop_first_max_recipients": ""},
    "own, no budget": {"pop_first_sender": "own", "pop_first_max_recipients": ""},
    # Large enough never to run out in a run: the cost measured is the counting.
    "own, budget": {
        "pop_first_sender": "own",
        "pop_first_max_recipients": 10_000_000,
        "pop_first_budget_window": 3600,
    },
}
EXPECTED = {"any, no budget": ACCEPT, "own, no budget": ACCEPT, "own, budget": CONTINUE}
TARGET = 0.98


def own_sender_scripts() -> list[Script]:
    """A session per whitelisted client, its sender the address of the user
    that start_popauth logged in there (``userNNN`` owns ``userNNN@local.test``)."""
    made = []
    for index, ip in enumerate(WHITELISTED_IPS):
        plain = script("whitelisted", ip, 40000 + index)
        sender = f"user{index:03d}@local.test"
        mail = macros(
            b"M", {"i": "4ABCDEF", "{mail_addr}": sender, "{mail_mailer}": "smtp"}
        ) + packet(b"M", f"<{sender}>\0".encode())
        made.append(Script(plain.kind, plain.connect, mail, plain.rcpt))
    return made


def run(mode: Mode, workdir: Path) -> BenchResult:
    result = BenchResult(
        "relay-budget-cost", "relay budget: POP-first sessions/s, budget on against off"
    )
    plans = own_sender_scripts()
    servers = {
        name: start_popauth(workdir / f"popauth-{index}", **settings)
        for index, (name, settings) in enumerate(SETUPS.items())
    }
    tallies = {name: Tally() for name in servers}
    concurrencies = (1, 8)
    try:
        setups = [f"{name}|{clients}" for clients in concurrencies for name in servers]

        def measure(setup: str, seconds: float) -> None:
            name, clients_text = setup.split("|")
            clients = int(clients_text)
            server, tally = servers[name], tallies[name]
            path = str(server.milter_path)

            def one(worker: int, iteration: int) -> None:
                session(path, plans[(iteration * clients + worker) % len(plans)], tally)

            cpu_before = process_cpu_seconds(pid_of(server.process))
            outcome = drive(clients, abs(seconds), one, max_operations=200_000)
            cpu = process_cpu_seconds(pid_of(server.process)) - cpu_before
            if outcome.errors:
                raise RuntimeError(f"{setup}: {outcome.errors} errors: {outcome.first_error}")
            if seconds > 0:
                result.metric(f"{name}, {clients} client(s)", "sessions/s").samples.append(
                    outcome.rate
                )
                result.metric(f"{name} CPU per session, {clients} client(s)", "us").samples.append(
                    1e6 * cpu / max(1, outcome.operations)
                )

        rounds(mode, setups, measure)
    finally:
        for server in servers.values():
            server.stop()

    for clients in concurrencies:
        ratio = result.ratio(
            f"own, budget / any, no budget, {clients} client(s)",
            f"own, budget, {clients} client(s)",
            f"any, no budget, {clients} client(s)",
        )
        result.checks.append(Check(ratio.name, ratio.stats().median, ">=", TARGET))
        result.ratio(
            f"own, no budget / any, no budget, {clients} client(s)",
            f"own, no budget, {clients} client(s)",
            f"any, no budget, {clients} client(s)",
        )
    for name, expected in EXPECTED.items():
        wrong = sum(
            count for (_, reply), count in tallies[name].replies.items() if reply != expected
        )
        if wrong:
            raise RuntimeError(f"{name}: {wrong} sessions did not end in {expected!r}")
    result.notes += [
        "every session: a whitelisted client, its own user's sender, one remote recipient; "
        "one milter connection per session: optneg, CONNECT, MAIL, RCPT, QUIT",
        "without a budget popauth accepts at MAIL; with it the RCPT is counted and answered",
        f"final replies, own, budget: {tallies['own, budget'].summary()}",
        f"final replies, any, no budget: {tallies['any, no budget'].summary()}",
    ]
    return result
