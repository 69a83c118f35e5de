"""A real ``popauth follow`` process for protocol and live tests."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.popauth_server import POPAUTH, PopauthServer, toml_value


class FollowerProcess:
    """Runs ``popauth follow --config FILE LOG`` against ``server``'s ingest socket."""

    def __init__(
        self,
        directory: Path,
        server: PopauthServer,
        log: str,
        user: str | None = None,
        wrapper: tuple[str, ...] = (),
        **settings: Any,
    ) -> None:
        # A command prefix, e.g. a mount namespace with the users of a test server.
        self.wrapper = wrapper
        self.directory = directory
        self.config_path = directory / "follow.toml"
        self.output_path = directory / "follow.out"
        self.log = log
        self.user = user
        self.settings: dict[str, Any] = {
            "ingest_socket": str(server.ingest_path),
            "follow_state_path": str(directory / "follow-state.json"),
            "log_format": "json",
            **settings,
        }
        # None leaves a key out (follow_state_path=None: the default).
        self.settings = {k: v for k, v in self.settings.items() if v is not None}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, stdin: int | None = None) -> FollowerProcess:
        self.config_path.write_text(
            "".join(f"{key} = {toml_value(value)}\n" for key, value in self.settings.items())
        )
        self.config_path.chmod(0o644)
        command = [*self.wrapper, POPAUTH, "follow", "--config", str(self.config_path), self.log]
        if self.user is not None:
            command = [
                "setpriv",
                f"--reuid={self.user}",
                f"--regid={self.user}",
                "--clear-groups",
                *command,
            ]
        with self.output_path.open("ab") as output:
            self.process = subprocess.Popen(command, stdin=stdin, stdout=output, stderr=output)
        self.wait_for_event("follow_start")
        return self

    def stop(self) -> int:
        if self.process is None:
            return 0
        self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            status = self.process.wait()
        self.process = None
        return status

    def output(self) -> str:
        return self.output_path.read_text() if self.output_path.exists() else ""

    def events(self, name: str) -> list[dict[str, Any]]:
        import json

        found = []
        for line in self.output().splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("event") == name:
                    found.append(event)
        return found

    def wait_for_event(
        self, name: str, count: int = 1, timeout: float = 15.0
    ) -> list[dict[str, Any]]:
        def probe() -> Any:
            found = self.events(name)
            if len(found) >= count:
                return found
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"popauth follow exited:\n{self.output()}")
            return None

        found: list[dict[str, Any]] = wait_until(
            probe,
            timeout,
            lambda: f"no {count} x {name} from popauth follow:\n{self.output()}",
        )
        return found


def wait_until(probe: Callable[[], Any], timeout: float, describe: Callable[[], str]) -> Any:
    """Poll ``probe`` until it returns something true; after ``timeout``, fail."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(describe())
        time.sleep(0.02)
