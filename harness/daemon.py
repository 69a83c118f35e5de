"""The base of every private daemon the harness runs: started in the foreground, as our child.

A daemon runs in a session of its own (``start_new_session``), so that
:meth:`ForegroundDaemon.stop` can end it together with every process it
forked (SMTP children, Dovecot's auth and login processes) through its
process group, and a failed start shows up as an exit status instead of a
silent timeout. Readiness is polled against a deadline; nothing sleeps a
guessed time.

A subclass says what to write before the start (:meth:`prepare`), what to
run (:meth:`command`), where its output goes (:attr:`output_path`), when it
is ready (:meth:`ready`) and what to show when it is not (:meth:`diagnostics`).
"""

from __future__ import annotations

import abc
import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import ClassVar, Self

from harness.ports import POLL_INTERVAL, group_members, log_tail, wait_group_gone


class DaemonError(RuntimeError):
    """A daemon could not be prepared, started or stopped; the message carries its output."""


class ForegroundDaemon(abc.ABC):
    """A private daemon: ``start()`` waits for readiness, ``stop()`` until all of it is gone."""

    # What messages call it ("postfix", "redis-server"...).
    name: ClassVar[str]
    # The error its failures raise (a subclass of DaemonError).
    error: ClassVar[type[DaemonError]] = DaemonError
    start_timeout: float = 20.0
    stop_timeout: float = 10.0

    process: subprocess.Popen[bytes] | None = None

    # -- what differs --------------------------------------------------------

    def prepare(self) -> None:  # noqa: B027 - most daemons have something to write; some not
        """Write the configuration and make the directories, before each start."""

    @abc.abstractmethod
    def command(self) -> list[str]:
        """The argv that runs the daemon in the foreground."""

    @property
    @abc.abstractmethod
    def output_path(self) -> Path:
        """Where the daemon's stdout and stderr go (a file: a pipe would outlive it)."""

    @abc.abstractmethod
    def ready(self) -> bool:
        """Whether the daemon serves; may raise :attr:`error` to give up at once."""

    def working_directory(self) -> Path | None:
        return None

    def diagnostics(self) -> str:
        """What to show when it fails: by default the end of its output."""
        return log_tail(self.output_path)

    def terminate(self, process: subprocess.Popen[bytes]) -> None:
        """Ask the daemon to stop: by default SIGTERM to its process group."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> Self:
        if self.process is not None:
            raise self.error(f"{self.name} already started")
        self.prepare()
        self.output_path.parent.mkdir(parents=True, exist_ok=True)
        with self.output_path.open("ab") as output:
            self.process = subprocess.Popen(
                self.command(),
                cwd=self.working_directory(),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.start_timeout
        try:
            while not self.ready():
                if self.process.poll() is not None:
                    raise self.error(
                        f"{self.name} exited with {self.process.returncode}:\n{self.diagnostics()}"
                    )
                if time.monotonic() > deadline:
                    raise self.error(
                        f"{self.name} not ready in {self.start_timeout} s:\n{self.diagnostics()}"
                    )
                time.sleep(POLL_INTERVAL)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Terminate, wait for the daemon, then for (or kill) the rest of its group."""
        process, self.process = self.process, None
        if process is None:
            return
        self.terminate(process)
        try:
            process.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        deadline = time.monotonic() + self.stop_timeout
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if wait_group_gone(process.pid, min(deadline, time.monotonic() + 5)):
                return
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
        if not wait_group_gone(process.pid, time.monotonic() + 5):
            raise self.error(f"{self.name} processes left: {group_members(process.pid)}")

    @property
    def pid(self) -> int:
        if self.process is None:
            raise self.error(f"{self.name} is not running")
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL the daemon itself: it vanishes at once, as in a crash."""
        process, self.process = self.process, None
        if process is not None:
            process.kill()
            process.wait()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
