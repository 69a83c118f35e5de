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
middle set-up tells the sender check's part from the budget's. The same
two ends are then measured through a real Postfix each (8 SMTP clients,
whitelisted clients only, :mod:`bench.postfix_e2e`'s messages), where the
milter's round trip is a smaller part of the whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import postfix_e2e
from bench.common import BenchResult, Check, Mode, drive, rounds
from bench.milter_protocol import (
    ACCEPT,
    CONTINUE,
    WHITELISTED_IPS,
    Script,
    Sessions,
    Tally,
    macros,
    measure_sessions,
    packet,
    pid_of,
    script,
    start_popauth,
)
from harness.ports import free_port
from harness.postfix import PostfixInstance

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
    result = milter_sessions(mode, workdir)
    through_postfix(mode, workdir / "postfix", result)
    return result


def milter_sessions(mode: Mode, workdir: Path) -> BenchResult:
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
            server = servers[name]
            milter = Sessions(
                name,
                str(server.milter_path),
                pid_of(server.process),
                plans,
                tallies[name],
                "sessions/s",
            )
            measure_sessions(result, milter, int(clients_text), seconds)

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


POSTFIX_SETUPS = ("any, no budget", "own, budget")


def through_postfix(mode: Mode, workdir: Path, result: BenchResult) -> None:
    """Messages/s through Postfix, whitelisted clients only, popauth with
    either end's settings; bench.postfix_e2e's sender is every login's own."""
    servers = {
        name: postfix_e2e.start_popauth(
            workdir / f"popauth-{index}", log_level="info", **SETUPS[name]
        )
        for index, name in enumerate(POSTFIX_SETUPS)
    }
    instances = {
        name: PostfixInstance(
            root=workdir / f"pf-{index}",
            smtp_port=free_port(),
            milter=f"unix:{servers[name].milter_path}",
            local_domain=postfix_e2e.LOCAL_DOMAIN,
        )
        for index, name in enumerate(POSTFIX_SETUPS)
    }
    codes: dict[str, dict[int, int]] = {name: {} for name in instances}
    started: list[PostfixInstance] = []
    clients = postfix_e2e.CLIENTS
    try:
        for instance in instances.values():
            instance.start()
            started.append(instance)

        def measure(name: str, seconds: float) -> None:
            instance, seen = instances[name], codes[name]
            sources = postfix_e2e.SOURCES["whitelisted"]

            def one(worker: int, iteration: int) -> None:
                source = sources[(iteration * clients + worker) % len(sources)]
                code = postfix_e2e.transaction(instance.smtp_port, source, "friend@remote.example")
                seen[code] = seen.get(code, 0) + 1

            postfix_e2e.wait_queue_empty(instance)
            outcome = drive(clients, abs(seconds), one, max_operations=100_000)
            if outcome.errors:
                raise RuntimeError(f"{name} through Postfix: {outcome.first_error}")
            if seconds > 0:
                result.metric(f"{name}, through Postfix", "messages/s").samples.append(outcome.rate)
            postfix_e2e.wait_queue_empty(instance)

        rounds(mode, list(instances), measure)
    finally:
        for instance in started:
            instance.stop()
        for server in servers.values():
            server.stop()
    for name, seen in codes.items():
        if set(seen) != {250}:
            raise RuntimeError(f"{name} through Postfix: RCPT replies {seen}, not all 250")
    ratio = result.ratio(
        "own, budget / any, no budget, through Postfix",
        "own, budget, through Postfix",
        "any, no budget, through Postfix",
    )
    result.checks.append(Check(ratio.name, ratio.stats().median, ">=", TARGET))
    result.notes.append(
        f"through Postfix: {clients} SMTP clients, whitelisted clients only, one remote "
        "recipient and a short message each; the sender is made every login's own "
        "(pop_first_sender_addresses)"
    )
