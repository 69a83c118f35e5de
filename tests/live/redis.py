"""A private, throw-away redis-server on loopback for live tests."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.live.ports import Daemon, read_log


class RedisError(RuntimeError):
    """redis-server failed to start or stop."""


class RedisInstance(Daemon):
    """``redis-server`` on 127.0.0.1:``port``, no persistence, data under ``root``.

    ``stop()`` and ``start()`` may be repeated to simulate an outage; the
    port stays the same, so clients reconnect on their own.
    """

    def __init__(self, *, root: Path, port: int) -> None:
        self.root = root
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        # The same server on a UNIX socket too, for unix:// URLs.
        self.socket_path = root / "redis.sock"
        self.unix_url = f"unix://{self.socket_path}?db=0"
        self.log_file = root / "redis.log"
        self._process: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisError("redis-server is not installed (make setup installs it)")
        self._process = subprocess.Popen(
            [
                binary,
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
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RedisError(f"redis-server exited:\n{read_log(self.log_file)}")
            if self.ping():
                return
            time.sleep(0.02)
        self.stop()
        raise RedisError(f"redis-server not ready:\n{read_log(self.log_file)}")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as connection:
                connection.sendall(b"PING\r\n")
                return connection.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def flush(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as connection:
            connection.sendall(b"FLUSHALL\r\n")
            if not connection.recv(64).startswith(b"+OK"):
                raise RedisError("FLUSHALL failed")
