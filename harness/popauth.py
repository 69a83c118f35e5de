"""Real popauth processes: ``popauth serve``, ``popauth follow`` and ``popauth sessions``.

Each runs with a configuration file written from keyword settings and JSON
logs in a file of its own, so that a test reads only its own events
(:meth:`PopauthProcess.events`) and waits for them
(:meth:`PopauthProcess.wait_for_event`) against a deadline, never a guessed
sleep. What differs between the three is their command line, their settings
and when they count as ready.
"""

from __future__ import annotations

import abc
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Self

from harness.dovecot import DovecotInstance
from harness.ports import POLL_INTERVAL, read_log
from popauth.doors.ingest.client import IngestClient, IngestUnreachable

_serial = itertools.count(1)

# The popauth of the Python running the tests; other packages ship a
# "popauth" of their own in /usr/bin (mailutils-pop3d does).
_BESIDE_PYTHON = Path(sys.executable).parent / "popauth"
POPAUTH = str(_BESIDE_PYTHON) if _BESIDE_PYTHON.exists() else shutil.which("popauth") or "popauth"

START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0


class PopauthProcessError(RuntimeError):
    """A popauth process did not start, stop or log as it should; the message has its output."""


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    return "[" + ", ".join(toml_value(item) for item in value) + "]"


def wait_until(probe: Callable[[], Any], timeout: float, describe: Callable[[], str]) -> Any:
    """Poll ``probe`` until it returns something true; after ``timeout``, fail."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(describe())
        time.sleep(POLL_INTERVAL)


class PopauthProcess(abc.ABC):
    """One ``popauth SUBCOMMAND --config FILE`` process and its JSON log.

    ``settings`` become the configuration file; a setting given as None is
    left out of it. ``wrapper`` is a command prefix that must exec popauth
    (e.g. a private mount namespace), so that signals reach popauth itself.
    """

    subcommand: ClassVar[str]

    def __init__(
        self,
        *,
        config_path: Path,
        log_path: Path,
        settings: dict[str, Any],
        wrapper: Sequence[str] = (),
    ) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.settings = {key: value for key, value in settings.items() if value is not None}
        self.wrapper = list(wrapper)
        self.process: subprocess.Popen[bytes] | None = None
        # Extra environment for the process (e.g. NOTIFY_SOCKET).
        self.environment: dict[str, str] = {}

    # -- what differs --------------------------------------------------------

    def arguments(self) -> list[str]:
        """Arguments after ``--config FILE``."""
        return []

    @abc.abstractmethod
    def ready(self) -> bool:
        """Whether the process has come far enough for a test to use it."""

    # -- running -------------------------------------------------------------

    def config_text(self) -> str:
        return "".join(f"{key} = {toml_value(value)}\n" for key, value in self.settings.items())

    def command(self) -> list[str]:
        return [
            *self.wrapper,
            POPAUTH,
            self.subcommand,
            "--config",
            str(self.config_path),
            *self.arguments(),
        ]

    def write_config(self) -> None:
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text())

    def launch(self, stdin: int | None = None) -> Self:
        """Start the process without waiting for it to be ready."""
        self.write_config()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdin=stdin,
                stdout=log,
                stderr=log,
                env={**os.environ, **self.environment},
            )
        return self

    def start(self, stdin: int | None = None, timeout: float = START_TIMEOUT) -> Self:
        """Launch, then wait until :meth:`ready`; a process that exits first fails at once."""
        self.launch(stdin)
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.process.poll() is not None:
                raise PopauthProcessError(
                    f"popauth {self.subcommand} exited at start:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise PopauthProcessError(
                    f"popauth {self.subcommand} not ready in {timeout}s:\n{self.output()}"
                )
            time.sleep(POLL_INTERVAL)
        return self

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM and wait (SIGKILL after ``timeout``); the exit status."""
        process, self.process = self.process, None
        if process is None:
            return 0
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()

    def kill(self) -> None:
        """SIGKILL: no clean stop (for ``serve``: no final snapshot)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    # -- what it said --------------------------------------------------------

    def output(self) -> str:
        """Everything the process wrote so far ('' before it wrote anything)."""
        return read_log(self.log_path)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON log events written so far, optionally only one kind."""
        found = []
        for line in self.output().splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if name is None or event.get("event") == name:
                    found.append(event)
        return found

    def wait_for_event(
        self, name: str, count: int = 1, timeout: float = START_TIMEOUT
    ) -> list[dict[str, Any]]:
        """Wait until ``count`` events ``name`` have been logged; all of them so far."""

        def probe() -> list[dict[str, Any]] | None:
            found = self.events(name)
            if len(found) >= count:
                return found
            if self.process is not None and self.process.poll() is not None:
                raise PopauthProcessError(f"popauth {self.subcommand} exited:\n{self.output()}")
            return None

        found: list[dict[str, Any]] = wait_until(
            probe,
            timeout,
            lambda: f"no {count} x {name} from popauth {self.subcommand}:\n{self.output()}",
        )
        return found

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class PopauthServer(PopauthProcess):
    """``popauth serve`` with its sockets in ``directory``.

    ``settings`` override the test defaults: JSON logs (so tests can read
    the decisions), no trusted networks (every test client is on loopback),
    and ``local.test`` as the local domain with ``local`` as its mailer; a
    setting given as None is left out (local_domains=None: learned from the MTA).
    """

    subcommand = "serve"

    def __init__(self, directory: Path, *, wrapper: Sequence[str] = (), **settings: Any) -> None:
        self.directory = directory
        self.milter_path = directory / "milter.sock"
        self.ingest_path = directory / "ingest.sock"
        super().__init__(
            config_path=directory / "popauth.toml",
            # One log per server, so each test reads only its own decisions.
            log_path=directory / f"popauth-{next(_serial)}.log",
            wrapper=wrapper,
            settings={
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
                "graduates_path": "",
                **settings,
            },
        )

    def ready(self) -> bool:
        """The ingest socket answers PING and every other socket accepts connections."""
        try:
            if IngestClient(str(self.ingest_path), timeout=1).request("PING") != ["OK pong"]:
                return False
        except IngestUnreachable:
            return False
        sockets = [self.milter_path]
        if self.settings.get("socketmap_socket"):
            sockets.append(Path(self.settings["socketmap_socket"]))
        if self.settings.get("policy_socket"):
            sockets.append(Path(self.settings["policy_socket"]))
        for path in sockets:
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
            except OSError:
                return False
            finally:
                probe.close()
        return True

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


class FollowerProcess(PopauthProcess):
    """``popauth follow --config FILE LOG`` against ``server``'s ingest socket.

    Ready once it has logged ``follow_start``. With ``user`` it runs as that
    user (setpriv), as the contrib unit runs it.
    """

    subcommand = "follow"

    def __init__(
        self,
        directory: Path,
        server: PopauthServer,
        log: str,
        user: str | None = None,
        wrapper: tuple[str, ...] = (),
        **settings: Any,
    ) -> None:
        self.directory = directory
        self.log = log
        self.user = user
        super().__init__(
            config_path=directory / "follow.toml",
            log_path=directory / "follow.out",
            wrapper=wrapper,
            settings={
                "ingest_socket": str(server.ingest_path),
                # None: the default.
                "follow_state_path": str(directory / "follow-state.json"),
                "log_format": "json",
                **settings,
            },
        )

    def arguments(self) -> list[str]:
        return [self.log]

    def command(self) -> list[str]:
        command = super().command()
        if self.user is None:
            return command
        return [
            "setpriv",
            f"--reuid={self.user}",
            f"--regid={self.user}",
            "--clear-groups",
            *command,
        ]

    def write_config(self) -> None:
        super().write_config()
        # Readable by the user it runs as.
        self.config_path.chmod(0o644)

    def ready(self) -> bool:
        return bool(self.events("follow_start"))


class SessionsProcess(PopauthProcess):
    """``popauth sessions`` renewing ``dovecot``'s sessions at ``ingest_socket``.

    Ready once its first cycle has been logged (so a renewal of every
    session open at start has been sent). Runs as root, like the unit in
    contrib: doveadm must reach Dovecot's anvil socket (mode 0600). Unlike
    the others, a stop that needs SIGKILL or ends with a non-zero status fails.
    """

    subcommand = "sessions"
    CYCLE_EVENTS = ("sessions_renewed", "sessions_unlisted", "sessions_not_renewed")

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
        super().__init__(
            config_path=directory / "sessions.toml",
            log_path=directory / "sessions.log",
            settings={
                "ingest_socket": str(ingest_socket),
                "ttl": ttl,
                "session_renew_interval": interval,
                "session_dovecot_config": str(dovecot.config_file),
                "log_format": "json",
            },
        )

    def launch(self, stdin: int | None = None) -> Self:
        return super().launch(subprocess.DEVNULL if stdin is None else stdin)

    def ready(self) -> bool:
        return bool(self.cycles())

    def cycles(self) -> list[dict[str, Any]]:
        """Every finished cycle's summary (or failure), in order."""
        return [event for event in self.events() if event["event"] in self.CYCLE_EVENTS]

    def wait_for_cycles(self, count: int, timeout: float) -> list[dict[str, Any]]:
        """Wait until ``count`` more cycles than now have finished; those cycles."""
        before = len(self.cycles())
        deadline = time.monotonic() + timeout
        while len(self.cycles()) < before + count:
            if self.process is None or self.process.poll() is not None:
                raise PopauthProcessError(f"popauth sessions exited:\n{self.output()}")
            if time.monotonic() > deadline:
                raise PopauthProcessError(f"no renewal cycle in {timeout}s:\n{self.output()}")
            time.sleep(POLL_INTERVAL)
        return self.cycles()[before : before + count]

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        process = self.process
        status = super().stop(timeout)
        if process is not None and status == -signal.SIGKILL:
            raise PopauthProcessError("popauth sessions ignored SIGTERM")
        if status != 0:
            raise PopauthProcessError(f"popauth sessions exited {status}:\n{self.output()}")
        return status
