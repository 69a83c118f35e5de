"""A private, throw-away redis-server on loopback for live tests."""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path
from typing import Any

import redis

from harness.daemon import DaemonError, ForegroundDaemon
from harness.ports import log_tail


class RedisError(DaemonError):
    """redis-server failed to start or stop."""


def redis_server() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RedisError("redis-server is not installed: run scripts/bootstrap test")
    return binary


class RedisInstance(ForegroundDaemon):
    """``redis-server`` on 127.0.0.1:``port``, no persistence, data under ``root``.

    ``stop()`` and ``start()`` may be repeated to simulate an outage; the
    port stays the same, so clients reconnect on their own.
    """

    def __init__(
        self,
        *,
        root: Path,
        port: int,
        replica_of: int | None = None,
        options: tuple[str, ...] = (),
    ) -> None:
        self.root = root
        self.port = port
        # A replica of the server on 127.0.0.1:replica_of.
        self.replica_of = replica_of
        # More redis-server options, e.g. ("--maxmemory-policy", "allkeys-lru").
        self.options = options
        self.url = f"redis://127.0.0.1:{port}/0"
        # The same server on a UNIX socket too, for unix:// URLs.
        self.socket_path = root / "redis.sock"
        self.unix_url = f"unix://{self.socket_path}?db=0"
        self.log_file = root / "redis.log"
        root.mkdir(parents=True, exist_ok=True)

    name = "redis-server"
    error = RedisError
    start_timeout = 15.0

    @property
    def output_path(self) -> Path:
        return self.root / "redis.out"

    def diagnostics(self) -> str:
        return f"{log_tail(self.output_path)}\n--- {self.log_file}\n{log_tail(self.log_file)}"

    def command(self) -> list[str]:
        return [
            redis_server(),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.root),
            "--logfile", str(self.log_file),
            "--daemonize", "no",
            # Lets tests stall the server (DEBUG SLEEP) to play a slow Redis.
            "--enable-debug-command", "local",
            *(["--replicaof", "127.0.0.1", str(self.replica_of)] if self.replica_of else []),
            *self.options,
        ]  # fmt: skip

    def ready(self) -> bool:
        return self.ping()

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as connection:
                connection.sendall(b"PING\r\n")
                return connection.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def has_replica_in_sync(self) -> bool:
        """Whether a replica has finished its first sync with this master:
        until then WAIT counts no replica."""
        with redis.Redis(port=self.port, socket_timeout=2) as client:
            info = client.info("replication")
        return bool(info.get("connected_slaves")) and "online" in str(info.get("slave0"))

    def wait_for_replica_in_sync(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.has_replica_in_sync():
            if time.monotonic() >= deadline:
                raise RedisError(f"no replica in sync with :{self.port} within {timeout}s")
            time.sleep(0.02)

    def flush(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as connection:
            connection.sendall(b"FLUSHALL\r\n")
            if not connection.recv(64).startswith(b"+OK"):
                raise RedisError("FLUSHALL failed")


class SentinelInstance(ForegroundDaemon):
    """``redis-server --sentinel`` on 127.0.0.1:``port`` watching one master.

    Short timers (down after 1 s) so a test sees a failover in seconds; the
    sentinel rewrites its own config file, which therefore lives under ``root``.
    """

    def __init__(
        self,
        *,
        root: Path,
        port: int,
        master_port: int,
        service: str,
        password: str = "",
        down_after_ms: int = 1000,
    ) -> None:
        self.root = root
        self.port = port
        self.master_port = master_port
        self.service = service
        self.password = password
        self.down_after_ms = down_after_ms
        self.config_file = root / "sentinel.conf"
        self.log_file = root / "sentinel.log"
        root.mkdir(parents=True, exist_ok=True)

    name = "redis sentinel"
    error = RedisError
    start_timeout = 15.0

    @property
    def output_path(self) -> Path:
        return self.root / "sentinel.out"

    def diagnostics(self) -> str:
        return f"{log_tail(self.output_path)}\n--- {self.log_file}\n{log_tail(self.log_file)}"

    def prepare(self) -> None:
        lines = [
            "bind 127.0.0.1",
            f"port {self.port}",
            "daemonize no",
            f"dir {self.root}",
            f"logfile {self.log_file}",
            f"sentinel monitor {self.service} 127.0.0.1 {self.master_port} 2",
            f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}",
            f"sentinel failover-timeout {self.service} 10000",
            f"sentinel parallel-syncs {self.service} 1",
        ]
        if self.password:
            # Clients and the other sentinels must all authenticate.
            lines += [f"requirepass {self.password}", f"sentinel sentinel-pass {self.password}"]
        self.config_file.write_text("\n".join(lines) + "\n")

    def command(self) -> list[str]:
        return [redis_server(), str(self.config_file), "--sentinel"]

    def ready(self) -> bool:
        return self.master_info() is not None

    def client(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, password=self.password or None, socket_timeout=2
        )

    def master_info(self) -> dict[str, Any] | None:
        """``SENTINEL MASTER service``, or None when the sentinel does not answer."""
        try:
            with self.client() as client:
                info: dict[str, Any] = client.sentinel_master(self.service)
                return info
        except redis.RedisError:
            return None
