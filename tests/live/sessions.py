"""A real ``popauth sessions`` process beside a private Dovecot, for live tests."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.live.dovecot import DovecotInstance
from tests.live.ports import Daemon, read_log
from tests.support.popauth_server import POPAUTH, toml_value


class SessionsError(RuntimeError):
    """popauth sessions did not start or stop as it should."""


class SessionsProcess(Daemon):
    """``popauth sessions --config`` renewing ``dovecot``'s sessions at ``ingest_socket``.

    Ready once its first cycle has been logged (so a renewal of every
    session open at start has been sent). Runs as root, like the unit in
    contrib: doveadm must reach Dovecot's anvil socket (mode 0600).
    """

    def __init__(
        self,
        *,
        directory: Path,
        dovecot: DovecotInstance,
        ingest_socket: Path,
        ttl: int,
        interval: float,
    ) -> None:
        self.directory = directory
        self.config_path = directory / "sessions.toml"
        self.log_path = directory / "sessions.log"
        self.settings: dict[str, Any] = {
            "ingest_socket": str(ingest_socket),
            "ttl": ttl,
            "session_renew_interval": interval,
            "session_dovecot_config": str(dovecot.config_file),
            "log_format": "json",
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            "".join(f"{key} = {toml_value(value)}\n" for key, value in self.settings.items())
        )
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [POPAUTH, "sessions", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        self.wait_for_cycles(1, timeout=15)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        found = []
        for line in read_log(self.log_path).splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if name is None or event.get("event") == name:
                    found.append(event)
        return found

    def cycles(self) -> list[dict[str, Any]]:
        """Every finished cycle's summary (or failure), in order."""
        return [
            event
            for event in self.events()
            if event["event"] in ("sessions_renewed", "sessions_unlisted", "sessions_not_renewed")
        ]

    def wait_for_cycles(self, count: int, timeout: float) -> list[dict[str, Any]]:
        """Wait until ``count`` more cycles than now have finished; those cycles."""
        before = len(self.cycles()) if self.process is not None else 0
        deadline = time.monotonic() + timeout
        while len(self.cycles()) < before + count:
            if self.process is None or self.process.poll() is not None:
                raise SessionsError(f"popauth sessions exited:\n{read_log(self.log_path)}")
            if time.monotonic() > deadline:
                raise SessionsError(f"no renewal cycle in {timeout}s:\n{read_log(self.log_path)}")
            time.sleep(0.02)
        return self.cycles()[before : before + count]

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            status = process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise SessionsError("popauth sessions ignored SIGTERM") from None
        if status != 0:
            raise SessionsError(f"popauth sessions exited {status}:\n{read_log(self.log_path)}")
