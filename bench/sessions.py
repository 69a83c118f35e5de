"""B6: the cost of one ``popauth sessions`` cycle at 10,000 open IMAP sessions.

One cycle is what runs every ``session_renew_interval`` on the Dovecot host:
the real ``doveadm -f tab who -1`` lists the sessions, popauth parses the
listing and sends one ``RENEW`` per distinct (address, user) over one
connection to a running ``popauth serve``, which extends each entry.

Opening 10,000 real IMAP sessions would measure Dovecot, not popauth, so
doveadm talks to a stand-in for Dovecot's anvil process: a UNIX socket in
the private ``base_dir`` that answers doveadm's ``CONNECT-DUMP`` with 10,000
connections in anvil's own line format (2.3: ``service/ip/user<TAB>pid<TAB>count``;
2.4: a version handshake, then ``pid<TAB>user<TAB>service<TAB>ip<TAB>guid<TAB>dest_ip``).
Everything from there on is the product: doveadm's formatting, the parser,
the client and the server with 10,000 whitelisted entries (memory store, and
Redis store with a private redis-server).

Reported per cycle: wall time of doveadm, of the parse, of the RENEW batch,
and the CPU time popauth serve (and redis-server) spent on the batch.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import subprocess
import threading
import time
from pathlib import Path

from tests.live.dovecot import DovecotSyntax, dovecot_syntax
from tests.live.ports import free_port
from tests.live.redis import RedisInstance
from tests.support.popauth_server import PopauthServer

from bench.common import BenchResult, Check, Mode, process_cpu_seconds, rounds
from popauth.client import IngestClient
from popauth.sessions import (
    EventLog,
    RenewalPlan,
    SessionRenewer,
    doveadm_command,
    list_sessions,
    parse_doveadm_who,
)

SESSIONS = 10_000
QUICK_SESSIONS = 2_000
# The default interval: ttl / 4 with the default ttl of 900 s.
DEFAULT_INTERVAL = 225.0


def address(n: int) -> str:
    return f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}"


def anvil_dump(count: int, syntax: DovecotSyntax) -> bytes:
    """What Dovecot's anvil answers to CONNECT-DUMP for ``count`` IMAP connections."""
    if syntax.is_2_4:
        # A header line (the alternative user name fields: none), then one
        # line per connection with its GUID (src/anvil/connect-limit.c).
        lines = [
            f"{10_000 + n}\tuser{n:05d}\timap\t{address(n)}\t{n:032x}\t127.0.0.1\n"
            for n in range(count)
        ]
        return ("\n" + "".join(lines) + "\n").encode()
    lines = [f"imap/{address(n)}/user{n:05d}\t{10_000 + n}\t1\n" for n in range(count)]
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


class CycleBench:
    """Runs renewal cycles against one popauth serve and records what each cost."""

    def __init__(
        self, result: BenchResult, command: list[str], count: int, redis: RedisInstance
    ) -> None:
        self.result = result
        self.command = command
        self.count = count
        self.redis = redis
        self.services = frozenset({"imap", "pop3"})
        self.servers: dict[str, PopauthServer] = {}
        self.doveadm_text = ""

    def add_server(self, name: str, directory: Path, **settings: str) -> None:
        directory.mkdir(parents=True)
        server = PopauthServer(directory, log_format="console", **settings).start()
        self.servers[name] = server
        # Every listed session has its entry, as after each client's login.
        logins = [f"LOGIN {address(n)} user{n:05d}" for n in range(self.count)]
        replies = IngestClient(str(server.ingest_path), 120).request_many(logins)
        if not all(reply.startswith("OK ") for reply in replies):
            raise RuntimeError(f"B6 {name}: LOGIN failed: {replies[0]}")

    def check_listing(self) -> None:
        listing = list_sessions(self.command, self.services, timeout=30)
        if len(listing.sessions) != self.count:
            raise RuntimeError(f"B6: doveadm listed {len(listing.sessions)} of {self.count}")
        completed = subprocess.run(self.command, capture_output=True, timeout=30, check=True)
        self.doveadm_text = completed.stdout.decode()

    def measure(self, setup: str, seconds: float) -> None:
        server = self.servers[setup]
        assert server.process is not None
        log = io.StringIO()
        plan = RenewalPlan(str(server.ingest_path), tuple(self.command), self.services, 60)
        renewer = SessionRenewer(plan, EventLog("json", "info", log))
        until = time.monotonic() + abs(seconds)
        while True:
            cpu_before = process_cpu_seconds(server.process.pid)
            redis_before = redis_cpu(self.redis)
            started = time.monotonic()
            if not renewer.cycle():
                raise RuntimeError(f"B6 {setup}: cycle failed: {log.getvalue()[-500:]}")
            cycle = time.monotonic() - started
            cpu = process_cpu_seconds(server.process.pid) - cpu_before
            redis_used = redis_cpu(self.redis) - redis_before
            summary = json.loads(log.getvalue().splitlines()[-1])
            if summary["renewed"] != self.count:
                raise RuntimeError(f"B6 {setup}: renewed {summary['renewed']} of {self.count}")
            parse_started = time.perf_counter()
            parse_doveadm_who(self.doveadm_text, self.services)
            parse = time.perf_counter() - parse_started
            if seconds > 0:
                self.record(setup, "whole cycle", "ms", 1e3 * cycle)
                self.record(setup, "doveadm who -1 (wall)", "ms", 1e3 * summary["list_seconds"])
                self.record(setup, "parsing the listing", "ms", 1e3 * parse)
                self.record(setup, "RENEW batch (wall)", "ms", 1e3 * summary["renew_seconds"])
                rate = self.count / summary["renew_seconds"]
                self.record(setup, "renewals", "renewals/s", rate)
                self.record(setup, "popauth serve CPU per cycle", "CPU ms", 1e3 * cpu)
                if setup == "redis":
                    self.record(setup, "redis-server CPU per cycle", "CPU ms", 1e3 * redis_used)
            if time.monotonic() >= until:
                return

    def record(self, setup: str, what: str, unit: str, value: float) -> None:
        self.result.metric(f"{setup} store: {what}", unit).samples.append(value)

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()


def run(mode: Mode, workdir: Path) -> BenchResult:
    count = QUICK_SESSIONS if mode.quick else SESSIONS
    result = BenchResult("B6", f"popauth sessions: one renewal cycle at {count:,} open sessions")
    base_dir = workdir / "dovecot-run"
    syntax = dovecot_syntax()
    anvil = FakeAnvil(base_dir, anvil_dump(count, syntax), anvil_greeting(syntax))
    dovecot_config = workdir / "dovecot.conf"
    dovecot_config.write_text(
        "".join(f"{line}\n" for line in [*syntax.preamble(), f"base_dir = {base_dir}"]),
        encoding="utf-8",
    )
    redis = RedisInstance(root=workdir / "redis", port=free_port())
    redis.start()
    bench = CycleBench(result, doveadm_command("doveadm", str(dovecot_config)), count, redis)
    try:
        bench.add_server("memory", workdir / "memory")
        bench.add_server("redis", workdir / "redis-store", store="redis", redis_url=redis.url)
        bench.check_listing()
        rounds(mode, ["memory", "redis"], bench.measure)
    finally:
        bench.stop()
        redis.stop()
        anvil.close()
    summarise(result, count)
    return result


def summarise(result: BenchResult, count: int) -> None:
    for setup in ("memory", "redis"):
        cpu = result.metric(f"{setup} store: popauth serve CPU per cycle", "CPU ms").stats()
        result.checks.append(
            Check(
                f"{setup} store: popauth serve CPU per cycle, {count:,} sessions",
                cpu.median,
                "<=",
                1000,
                "CPU ms",
            )
        )
        # Every cycle of the default interval costs this share of one core.
        result.notes.append(
            f"{setup} store: {cpu.median / 1e3 / DEFAULT_INTERVAL:.2%} of one core "
            f"at the default interval ({DEFAULT_INTERVAL:.0f} s)"
        )
    whole = result.metric("memory store: whole cycle", "ms").stats()
    result.checks.append(
        Check(f"memory store: whole cycle, {count:,} sessions", whole.median, "<=", 5000, "ms")
    )
    result.notes.append(
        "doveadm reads a stand-in for Dovecot's anvil socket; CPU is from /proc (10 ms ticks)"
    )


def redis_cpu(redis: RedisInstance) -> float:
    return process_cpu_seconds(redis.pid)
