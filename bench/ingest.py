"""B4: LOGIN requests per second over the ingest socket of a running ``popauth serve``.

Clients speak the line protocol as a hook would, one request and its reply
at a time (no pipelining), each over one persistent connection: one client
alone, and 16 concurrent clients. Two more rows for context: 16 clients
that open a connection per LOGIN (what each hook run does), and the same
persistent runs against a popauth with ``log_level = "warning"`` (every
LOGIN is otherwise one info log line). The addresses cycle through 20 000
distinct IPv4 addresses, so most requests are renewals after the warm-up.

Two rows price ``redis_wait_replicas``: the Redis store on a master with one
replica (both on loopback), without and with ``WAIT 1`` on each LOGIN.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from bench.common import BenchResult, Check, Mode, drive, process_cpu_seconds, rounds
from harness.popauth import PopauthServer
from harness.ports import free_port
from harness.redis import RedisInstance

REQUESTS = [
    f"LOGIN 10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256} user{n % 5000:04d}\n".encode()
    for n in range(20_000)
]


def read_line(sock: socket.socket) -> bytes:
    data = sock.recv(4096)
    while not data.endswith(b"\n"):
        more = sock.recv(4096)
        if not more:
            raise ConnectionError("ingest endpoint closed the connection")
        data += more
    return data


class IngestLoad:
    """Clients of the ingest socket: one persistent connection each, or one per LOGIN."""

    def __init__(self, path: str, clients: int, style: str) -> None:
        self.path = path
        self.clients = clients
        self.per_login = style == "per-login"
        self.connections: dict[int, socket.socket] = {}

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(self.path)
        return sock

    def one(self, worker: int, iteration: int) -> None:
        request = REQUESTS[(iteration * self.clients + worker) % len(REQUESTS)]
        if self.per_login:
            with self.connect() as fresh:
                fresh.sendall(request)
                reply = read_line(fresh)
        else:
            kept = self.connections.get(worker)
            if kept is None:
                kept = self.connections[worker] = self.connect()
            kept.sendall(request)
            reply = read_line(kept)
        if not reply.startswith(b"OK "):
            raise RuntimeError(f"unexpected reply {reply!r}")

    def close(self) -> None:
        for sock in self.connections.values():
            sock.close()


def run(mode: Mode, workdir: Path) -> BenchResult:
    result = BenchResult("B4", "ingest: LOGIN requests/s over the ingest socket")
    servers: dict[str, PopauthServer] = {}
    master = RedisInstance(root=workdir / "redis-master", port=free_port())
    replica = RedisInstance(
        root=workdir / "redis-replica", port=free_port(), replica_of=master.port
    )
    redis_store = {"store": "redis", "redis_url": master.url, "redis_timeout": 2.0}
    variants: dict[str, dict[str, Any]] = {
        "popauth": {"log_level": "info"},
        "popauth[warning]": {"log_level": "warning"},
        "popauth[redis]": {"log_level": "info", **redis_store},
        "popauth[redis, WAIT 1]": {
            "log_level": "info",
            **redis_store,
            "redis_wait_replicas": 1,
            "redis_wait_timeout": 1.0,
        },
    }
    setups = [
        "popauth|1|persistent",
        "popauth|16|persistent",
        "popauth|16|per-login",
        "popauth[warning]|1|persistent",
        "popauth[warning]|16|persistent",
        "popauth[redis]|16|persistent",
        "popauth[redis, WAIT 1]|16|persistent",
    ]
    try:
        master.start()
        replica.start()
        # WAIT counts a replica only once its first sync is done.
        master.wait_for_replica_in_sync()
        for index, (name, settings) in enumerate(variants.items()):
            directory = workdir / f"popauth-{index}"
            directory.mkdir(parents=True)
            servers[name] = PopauthServer(
                directory, log_format="console", max_entries=100_000, **settings
            ).start()

        def measure(setup: str, seconds: float) -> None:
            name, clients_text, style = setup.split("|")
            clients = int(clients_text)
            load = IngestLoad(str(servers[name].ingest_path), clients, style)

            process = servers[name].process
            assert process is not None
            cpu_before = process_cpu_seconds(process.pid)
            try:
                outcome = drive(clients, abs(seconds), load.one, max_operations=2_000_000)
            finally:
                load.close()
            cpu = process_cpu_seconds(process.pid) - cpu_before
            if outcome.errors:
                raise RuntimeError(f"B4 {setup}: {outcome.errors} errors: {outcome.first_error}")
            if seconds > 0:
                label = f"{name}, {clients} client(s), {style}"
                result.metric(label, "logins/s").samples.append(outcome.rate)
                result.metric(f"{label}: server CPU per login", "us").samples.append(
                    1e6 * cpu / max(1, outcome.operations)
                )

        rounds(mode, setups, measure)
    finally:
        for server in servers.values():
            server.stop()
        replica.stop()
        master.stop()

    aggregate = result.metric("popauth, 16 client(s), persistent", "logins/s").stats()
    result.checks.append(
        Check("16 clients, aggregate logins/s", aggregate.median, ">=", 20_000, "logins/s")
    )
    result.ratio(
        "16 clients / 1 client",
        "popauth, 16 client(s), persistent",
        "popauth, 1 client(s), persistent",
    )
    result.ratio(
        "popauth[warning]/popauth, 16 clients",
        "popauth[warning], 16 client(s), persistent",
        "popauth, 16 client(s), persistent",
    )
    result.ratio(
        "redis: WAIT 1 / no WAIT, 16 clients",
        "popauth[redis, WAIT 1], 16 client(s), persistent",
        "popauth[redis], 16 client(s), persistent",
    )
    result.notes.append(
        "clients are threads of the harness process, on the same 2 cores as the server"
    )
    return result
