"""A real ``popauth serve`` process for protocol and live tests."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from popauth.doors.ingest.client import IngestClient, IngestUnreachable

_serial = itertools.count(1)

# The popauth of the Python running the tests; other packages ship a
# "popauth" of their own in /usr/bin (mailutils-pop3d does).
_BESIDE_PYTHON = Path(sys.executable).parent / "popauth"
POPAUTH = str(_BESIDE_PYTHON) if _BESIDE_PYTHON.exists() else shutil.which("popauth") or "popauth"


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    return "[" + ", ".join(toml_value(item) for item in value) + "]"


class PopauthServer:
    """Runs ``popauth serve --config`` with sockets in ``directory``.

    ``settings`` override the test defaults: JSON logs (so tests can read
    the decisions), no trusted networks (every test client is on loopback),
    and ``local.test`` as the local domain with ``local`` as its mailer; a
    setting given as None is left out of the file.
    """

    def __init__(self, directory: Path, *, wrapper: Sequence[str] = (), **settings: Any) -> None:
        self.directory = directory
        # A command that runs popauth (e.g. in a private mount namespace);
        # it must exec it, so that signals reach popauth itself.
        self.wrapper = list(wrapper)
        self.milter_path = directory / "milter.sock"
        self.ingest_path = directory / "ingest.sock"
        self.config_path = directory / "popauth.toml"
        # One log per server, so each test reads only its own decisions.
        self.log_path = directory / f"popauth-{next(_serial)}.log"
        self.settings: dict[str, Any] = {
            "milter_socket": f"unix:{self.milter_path}",
            "ingest_socket": str(self.ingest_path),
            "milter_socket_mode": "0666",
            "ingest_socket_mode": "0666",
            "trusted_networks": [],
            "local_domains": ["local.test"],
            "local_mailers": ["local"],
            "log_format": "json",
            # Each test starts from an empty whitelist unless it asks otherwise.
            "snapshot_path": "",
            "usage_path": "",
            "blocklist_path": "",
            **settings,
        }
        # None leaves a key out (local_domains=None: learned from the MTA).
        self.settings = {k: v for k, v in self.settings.items() if v is not None}
        self.process: subprocess.Popen[bytes] | None = None
        # Extra environment for the process (e.g. NOTIFY_SOCKET).
        self.environment: dict[str, str] = {}

    def config_text(self) -> str:
        return "".join(f"{key} = {toml_value(value)}\n" for key, value in self.settings.items())

    def launch(self) -> PopauthServer:
        """Start the process without waiting for it to be ready."""
        self.config_path.write_text(self.config_text())
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [*self.wrapper, POPAUTH, "serve", "--config", str(self.config_path)],
            stdout=log,
            stderr=log,
            env={**os.environ, **self.environment},
        )
        log.close()
        return self

    def start(self, timeout: float = 15.0) -> PopauthServer:
        self.launch()
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"popauth exited at start:\n{self.log_path.read_text()}")
            if self._ready():
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"popauth not ready in {timeout}s:\n{self.log_path.read_text()}")

    def _ready(self) -> bool:
        try:
            if IngestClient(str(self.ingest_path), timeout=1).request("PING") != ["OK pong"]:
                return False
        except IngestUnreachable:
            return False
        sockets = [self.milter_path]
        if self.settings.get("socketmap_socket"):
            sockets.append(Path(self.settings["socketmap_socket"]))
        for path in sockets:
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
            except OSError:
                return False
            finally:
                probe.close()
        return True

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            status = self.process.wait()
        self.process = None
        return status

    def kill(self) -> None:
        """SIGKILL: no clean stop, no final snapshot."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def ask(self, line: str) -> list[str]:
        return IngestClient(str(self.ingest_path), timeout=5).request(line)

    def cli(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        """Run a ``popauth`` client subcommand against this server."""
        command, *rest = arguments
        return subprocess.run(
            [POPAUTH, command, "--socket", str(self.ingest_path), *rest],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON log events written so far, optionally only one kind."""
        found = []
        for line in self.log_path.read_text().splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if name is None or event.get("event") == name:
                    found.append(event)
        return found

    def __enter__(self) -> PopauthServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
