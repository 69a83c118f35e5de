"""Running the MTA's own query tools (postconf, postmap, sendmail -bt).

Every tool runs with a time limit, and a :class:`CommandRunner` can be
cancelled from another thread: a stop must never wait for a ``postconf``
that hangs, or a ``postmap`` on an LDAP table whose server is unreachable.
Cancelling kills the tool's whole process group at once and refuses to
start more. Long listings (``postmap -s`` of a big table) are streamed line
by line, so memory stays bounded by what the caller keeps.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Protocol

from popauth.basics.errors import UnavailableError

# Where the MTA tools live when PATH (a service's PATH, say) lacks them.
SYSTEM_TOOL_DIRECTORIES = ("/usr/sbin", "/usr/local/sbin", "/usr/bin", "/sbin")
# Sendmail waits 60 s for an unqualified host name; never let a start hang that long.
# For a streamed listing this is the longest silence allowed, not the whole run.
COMMAND_TIMEOUT = 20.0
# How often a waiting runner looks whether it was cancelled.
POLL_INTERVAL = 0.05
READ_SIZE = 1 << 16
# No key or value of a Postfix table comes near this.
MAX_LINE_BYTES = 1 << 20


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    stdout: str
    stderr: str

    def error_text(self) -> str:
        """The tool's own complaint, on one line."""
        text = (self.stderr.strip() or self.stdout.strip()).splitlines()
        return text[-1] if text else f"exit status {self.returncode}"


class CommandUnavailable(UnavailableError):
    """The tool is missing, did not finish in time, or the runner was cancelled."""


class CommandFailed(UnavailableError):
    """A streamed tool exited with an error; ``result`` has its complaint."""

    def __init__(self, result: CommandResult) -> None:
        super().__init__(result.error_text())
        self.result = result


class Runner(Protocol):
    """How learning runs tools; tests give their own."""

    def run(self, argv: Sequence[str], stdin: str = "") -> CommandResult: ...

    def lines(self, argv: Sequence[str]) -> Iterator[str]:
        """stdout line by line; CommandFailed after the last one if the tool failed."""
        ...


def find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    path = os.pathsep.join(SYSTEM_TOOL_DIRECTORIES)
    return shutil.which(name, path=path)


class CommandRunner:
    """Runs tools in our environment (so MAIL_CONFIG applies), cancellable."""

    def __init__(self, timeout: float = COMMAND_TIMEOUT) -> None:
        self._timeout = timeout
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen[bytes]] = set()
        self._cancelled = False

    def cancel(self) -> None:
        """Kill every tool running now and refuse to start another (any thread)."""
        with self._lock:
            self._cancelled = True
            running = list(self._running)
        # Only the kill: the thread that runs the tool sees it end, then reaps
        # it and closes its pipes (closing them here would pull them from under it).
        for process in running:
            kill_process_group(process)

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def _spawn(
        self, argv: Sequence[str], stdin: int, stderr: IO[bytes] | int
    ) -> subprocess.Popen[bytes]:
        with self._lock:
            if self._cancelled:
                raise CommandUnavailable(f"{argv[0]}: not run, popauth is stopping")
            try:
                process = subprocess.Popen(
                    list(argv),
                    stdin=stdin,
                    stdout=subprocess.PIPE,
                    stderr=stderr,
                    # Its own process group: a kill reaches whatever it started.
                    start_new_session=True,
                )
            except FileNotFoundError:
                raise CommandUnavailable(f"{argv[0]}: not found") from None
            except PermissionError:
                raise CommandUnavailable(f"{argv[0]}: permission denied") from None
            self._running.add(process)
        return process

    def _release(self, process: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._running.discard(process)
        kill_process_group(process)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=COMMAND_TIMEOUT)
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def _check(self, argv: Sequence[str], deadline: float, what: str) -> None:
        if self._cancelled:
            raise CommandUnavailable(f"{argv[0]}: stopped, popauth is stopping")
        if time.monotonic() > deadline:
            raise CommandUnavailable(f"{' '.join(argv)} {what} {self._timeout:.0f} s")

    def run(self, argv: Sequence[str], stdin: str = "") -> CommandResult:
        """Run a tool to its end with ``stdin``; its whole output is kept."""
        process = self._spawn(argv, subprocess.PIPE, subprocess.PIPE)
        deadline = time.monotonic() + self._timeout
        data: bytes | None = stdin.encode("utf-8", "surrogateescape")
        try:
            while True:
                try:
                    stdout, stderr = process.communicate(data, timeout=POLL_INTERVAL)
                    break
                except subprocess.TimeoutExpired:
                    data = None  # already handed over; retrying loses nothing
                    self._check(argv, deadline, "did not finish within")
        finally:
            self._release(process)
        self._check(argv, deadline=float("inf"), what="")
        return CommandResult(
            process.returncode,
            stdout.decode("utf-8", "replace"),
            stderr.decode("utf-8", "replace"),
        )

    def lines(self, argv: Sequence[str]) -> Iterator[str]:
        """stdout line by line, read in chunks: memory does not grow with the output."""
        with tempfile.TemporaryFile() as errors:
            process = self._spawn(argv, subprocess.DEVNULL, errors)
            try:
                yield from self._stream(argv, process)
                deadline = time.monotonic() + self._timeout
                while process.poll() is None:
                    self._check(argv, deadline, "did not exit within")
                    time.sleep(POLL_INTERVAL)
            finally:
                self._release(process)
            self._check(argv, deadline=float("inf"), what="")
            if process.returncode != 0:
                errors.seek(0)
                complaint = errors.read(READ_SIZE).decode("utf-8", "replace")
                raise CommandFailed(CommandResult(process.returncode, "", complaint))

    def _stream(self, argv: Sequence[str], process: subprocess.Popen[bytes]) -> Iterator[str]:
        assert process.stdout is not None
        descriptor = process.stdout.fileno()
        pending = b""
        deadline = time.monotonic() + self._timeout
        with selectors.DefaultSelector() as selector:
            selector.register(descriptor, selectors.EVENT_READ)
            while True:
                self._check(argv, deadline, "printed nothing for")
                if not selector.select(POLL_INTERVAL):
                    continue
                chunk = os.read(descriptor, READ_SIZE)
                if not chunk:
                    break
                deadline = time.monotonic() + self._timeout
                pending += chunk
                cut = pending.rfind(b"\n")
                if cut < 0:
                    if len(pending) > MAX_LINE_BYTES:
                        raise CommandUnavailable(f"{' '.join(argv)}: a line over 1 MiB")
                    continue
                complete, pending = pending[:cut], pending[cut + 1 :]
                yield from complete.decode("utf-8", "replace").split("\n")
        if pending:
            yield pending.decode("utf-8", "replace")


def kill_process_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL to the group of ``process``, started with ``start_new_session``."""
    # Not yet reaped, so its pid (the group's id) cannot belong to anyone else.
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
