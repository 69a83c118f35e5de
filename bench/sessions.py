"""session-renewals: the cost of ``popauth sessions`` cycles at 10,000 and 100,000 open sessions.

One cycle is what runs every ``session_renew_interval`` on the Dovecot host:
the real ``doveadm -f tab who -1`` lists the sessions, popauth parses the
listing and pipelines one ``RENEW`` per distinct (address, user) over one
connection to a running ``popauth serve``, which renews them a batch at a
time (with Redis, one script call per batch).

Opening 100,000 real IMAP sessions would measure Dovecot, not popauth, so
doveadm talks to a stand-in for Dovecot's anvil process: a UNIX socket in
a private ``base_dir`` that answers doveadm's ``CONNECT-DUMP`` in anvil's
own line format (``service/ip/user<TAB>pid<TAB>count``). Everything from
there on is the product: doveadm's formatting, the parser, the client and
the server with every listed session whitelisted (memory store, and Redis
store with a private redis-server).

Side by side at the smaller size, the same Redis store asked one ``RENEW``
per round trip (the client waits for each reply, so nothing can be
batched): what a cycle cost before renewals were batched.

Reported per cycle: wall time of the whole cycle, of doveadm, of the
parse, of the renewals, and the CPU time popauth serve (and redis-server)
spent on the cycle.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import BenchResult, Check, Mode, process_cpu_seconds, rounds
from harness.dovecot import DovecotSyntax, dovecot_syntax
from harness.popauth import PopauthServer
from harness.ports import free_port
from harness.redis import RedisInstance
from popauth.companions.sessions import (
    RenewalPlan,
    SessionRenewer,
    doveadm_command,
    list_sessions,
    parse_doveadm_who,
)
from popauth.doors.ingest import wire
from popauth.doors.ingest.client import IngestClient
from popauth.telemetry.levels import LogFormat, LogLevel
from popauth.telemetry.logs import logger_writing_to

SIZES = (10_000, 100_000)
QUICK_SIZES = (2_000,)
# The default interval: ttl / 4 with the default ttl of 900 s.
DEFAULT_INTERVAL = 225.0
# "Well inside the interval": a cycle takes at most this share of it.
INTERVAL_SHARE = 0.1
SERVICES = frozenset({"imap", "pop3"})

MEMORY = "memory store"
REDIS = "redis store"
UNBATCHED = "redis store, one RENEW per round trip"


def address(n: int) -> str:
    return f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}"


def user(n: int) -> str:
    return f"user{n:06d}"


def anvil_dump(count: int, syntax: DovecotSyntax) -> bytes:
    """What Dovecot's anvil answers to CONNECT-DUMP for ``count`` IMAP connections."""
    if syntax.is_2_4:
        # A header line (the alternative user name fields: none), then one
        # line per connection with its GUID (src/anvil/connect-limit.c).
        lines = [
            f"{10_000 + n}\t{user(n)}\timap\t{address(n)}\t{n:032x}\t127.0.0.1\n"
            for n in range(count)
        ]
        return ("\n" + "".join(lines) + "\n").encode()
    lines = [f"imap/{address(n)}/{user(n)}\t{10_000 + n}\t1\n" for n in range(count)]
    return ("".join(lines) + "\n").encode()


def anvil_greeting(syntax: DovecotSyntax) -> bytes:
    """What anvil sends first on a new connection (2.4 only; 2.3 says nothing)."""
    return b"VERSION\tanvil-server\t2\t0\n" if syntax.is_2_4 else b""


class FakeAnvil:
    """A UNIX socket at ``base_dir/anvil`` answering CONNECT-DUMP, in a thread."""

    def __init__(self, base_dir: Path, dump: bytes, greeting: bytes = b"") -> None:
        base_dir.mkdir(parents=True, exist_ok=True)
        self.path = base_dir / "anvil"
        self._dump = dump
        self._greeting = greeting
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.path))
        self._listener.listen(8)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return  # closed
            with connection:
                with contextlib.suppress(OSError):
                    connection.sendall(self._greeting)
                request = b""
                while b"CONNECT-DUMP\n" not in request:
                    chunk = connection.recv(4096)
                    if not chunk:
                        break
                    request += chunk
                with contextlib.suppress(OSError):
                    connection.sendall(self._dump)

    def close(self) -> None:
        self._listener.close()


@dataclass
class Listing:
    """One size: its anvil stand-in and the doveadm command that reads it."""

    count: int
    anvil: FakeAnvil
    command: list[str]
    text: str = ""


@dataclass
class Cycle:
    """What one cycle took."""

    whole: float
    listing: float
    renewals: float
    renewed: int


class CycleBench:
    """Runs renewal cycles against popauth serve processes and records what each cost."""

    def __init__(self, result: BenchResult, redis: RedisInstance) -> None:
        self.result = result
        self.redis = redis
        self.servers: dict[str, PopauthServer] = {}

    def add_server(self, name: str, directory: Path, count: int, **settings: Any) -> None:
        directory.mkdir(parents=True)
        server = PopauthServer(
            directory, log_format="console", max_entries=max(count, 100_000), **settings
        )
        self.servers[name] = server.start()
        # Every listed session has its entry, as after each client's login.
        logins = [f"LOGIN {address(n)} {user(n)}" for n in range(count)]
        replies = IngestClient(str(server.ingest_path), 600).request_many(logins, window=500)
        if not all(reply.startswith("OK ") for reply in replies):
            raise RuntimeError(f"session-renewals {name}: LOGIN failed: {replies[0]}")

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()

    def batched_cycle(self, server: PopauthServer, listing: Listing) -> Cycle:
        """One cycle of ``popauth sessions`` itself, read back from its summary event."""
        log = io.StringIO()
        plan = RenewalPlan(str(server.ingest_path), tuple(listing.command), SERVICES, 600)
        started = time.monotonic()
        if not SessionRenewer(plan, logger_writing_to(log, LogFormat.JSON, LogLevel.INFO)).cycle():
            raise RuntimeError(f"session-renewals: cycle failed: {log.getvalue()[-500:]}")
        whole = time.monotonic() - started
        summary = json.loads(log.getvalue().splitlines()[-1])
        return Cycle(whole, summary["list_seconds"], summary["renew_seconds"], summary["renewed"])

    def unbatched_cycle(self, server: PopauthServer, listing: Listing) -> Cycle:
        """The same cycle, each RENEW sent only when the previous one is answered."""
        started = time.monotonic()
        sessions = list_sessions(listing.command, SERVICES, timeout=600).sessions
        listed = time.monotonic()
        lines = [f"RENEW {session.address} {session.user}" for session in sessions]
        replies = IngestClient(str(server.ingest_path), 600).request_many(lines, window=1)
        done = time.monotonic()
        renewed = sum(reply.startswith("OK ") for reply in replies)
        return Cycle(done - started, listed - started, done - listed, renewed)

    def measurer(self, listing: Listing) -> Callable[[str, float], None]:
        def measure(setup: str, seconds: float) -> None:
            # The unbatched set-up asks the Redis store's server too.
            server = self.servers[REDIS if setup == UNBATCHED else setup]
            assert server.process is not None
            run = self.unbatched_cycle if setup == UNBATCHED else self.batched_cycle
            cycles: list[Cycle] = []
            cpu_before = process_cpu_seconds(server.process.pid)
            redis_before = process_cpu_seconds(self.redis.pid)
            until = time.monotonic() + abs(seconds)
            while not cycles or time.monotonic() < until:
                cycle = run(server, listing)
                if cycle.renewed != listing.count:
                    raise RuntimeError(
                        f"session-renewals {setup}: renewed {cycle.renewed} of {listing.count}"
                    )
                cycles.append(cycle)
            cpu = (process_cpu_seconds(server.process.pid) - cpu_before) / len(cycles)
            redis_cpu = (process_cpu_seconds(self.redis.pid) - redis_before) / len(cycles)
            if seconds < 0:
                return  # a warm-up
            parse_started = time.perf_counter()
            parse_doveadm_who(listing.text, SERVICES)
            parse = time.perf_counter() - parse_started

            def record(what: str, unit: str, value: float) -> None:
                name = f"{listing.count:,} sessions, {setup}: {what}"
                self.result.metric(name, unit).samples.append(value)

            record("whole cycle", "ms", 1e3 * statistics.median(c.whole for c in cycles))
            record(
                "doveadm who -1 (wall)", "ms", 1e3 * statistics.median(c.listing for c in cycles)
            )
            record("parsing the listing", "ms", 1e3 * parse)
            renewals = statistics.median(c.renewals for c in cycles)
            record("renewals (wall)", "ms", 1e3 * renewals)
            record("renewals", "renewals/s", listing.count / renewals)
            record("popauth serve CPU per cycle", "CPU ms", 1e3 * cpu)
            if setup != MEMORY:
                record("redis-server CPU per cycle", "CPU ms", 1e3 * redis_cpu)

        return measure


def make_listing(workdir: Path, count: int) -> Listing:
    base_dir = workdir / f"dovecot-run-{count}"
    syntax = dovecot_syntax()
    anvil = FakeAnvil(base_dir, anvil_dump(count, syntax), anvil_greeting(syntax))
    config = workdir / f"dovecot-{count}.conf"
    config.write_text(
        "".join(f"{line}\n" for line in [*syntax.preamble(), f"base_dir = {base_dir}"]),
        encoding="utf-8",
    )
    listing = Listing(count, anvil, doveadm_command("doveadm", str(config)))
    listed = list_sessions(listing.command, SERVICES, timeout=120)
    if len(listed.sessions) != count:
        anvil.close()
        raise RuntimeError(f"session-renewals: doveadm listed {len(listed.sessions)} of {count}")
    completed = subprocess.run(listing.command, capture_output=True, timeout=120, check=True)
    listing.text = completed.stdout.decode()
    return listing


def run(mode: Mode, workdir: Path) -> BenchResult:
    sizes = QUICK_SIZES if mode.quick else SIZES
    result = BenchResult(
        "session-renewals",
        "popauth sessions: one renewal cycle at "
        + " and ".join(f"{count:,}" for count in sizes)
        + " open sessions",
    )
    workdir.mkdir(parents=True, exist_ok=True)
    redis = RedisInstance(root=workdir / "redis", port=free_port())
    bench = CycleBench(result, redis)
    listings: list[Listing] = []
    try:
        redis.start()
        bench.add_server(MEMORY, workdir / "memory", max(sizes))
        bench.add_server(
            REDIS, workdir / "redis-store", max(sizes), store="redis", redis_url=redis.url
        )
        for count in sizes:
            listings.append(make_listing(workdir, count))
            setups = [MEMORY, REDIS]
            if count == min(sizes):
                setups.append(UNBATCHED)
            rounds(mode, setups, bench.measurer(listings[-1]))
    finally:
        for listing in listings:
            listing.anvil.close()
        bench.stop()
        redis.stop()
    summarise(result, sizes)
    return result


def summarise(result: BenchResult, sizes: tuple[int, ...]) -> None:
    smallest, largest = min(sizes), max(sizes)
    cpu = f"{smallest:,} sessions, %s: popauth serve CPU per cycle"
    result.ratio(
        f"{smallest:,} sessions: popauth serve CPU, batched / one RENEW per round trip (redis)",
        cpu % REDIS,
        cpu % UNBATCHED,
    )
    for setup in (MEMORY, REDIS):
        median = result.metric(cpu % setup, "CPU ms").stats().median
        result.checks.append(
            Check(
                f"{setup}: popauth serve CPU per cycle, {smallest:,} sessions",
                median,
                "<=",
                1000,
                "CPU ms",
            )
        )
    budget = 1e3 * DEFAULT_INTERVAL * INTERVAL_SHARE
    for setup in (MEMORY, REDIS):
        whole = result.metric(f"{largest:,} sessions, {setup}: whole cycle", "ms").stats().median
        result.checks.append(
            Check(
                f"{setup}: whole cycle, {largest:,} sessions "
                f"({INTERVAL_SHARE:.0%} of the default interval)",
                whole,
                "<=",
                budget,
                "ms",
            )
        )
        share = result.metric(
            f"{largest:,} sessions, {setup}: popauth serve CPU per cycle", "CPU ms"
        )
        result.notes.append(
            f"{setup}, {largest:,} sessions: {share.stats().median / 1e3 / DEFAULT_INTERVAL:.2%} "
            f"of one core at the default interval ({DEFAULT_INTERVAL:.0f} s)"
        )
    result.notes.append(
        "doveadm reads a stand-in for Dovecot's anvil socket; CPU is from /proc (10 ms ticks), "
        f"averaged over each round's cycles; {wire.RENEW_BATCH} renewals per batch"
    )
