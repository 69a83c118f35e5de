"""Client side of the ingest protocol, for the login hook and the CLI.

Imports only the standard library: ``popauth login`` runs inside every POP
login, so it must start fast, and it must give up within its deadline
whatever the endpoint does.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import time
from collections.abc import Callable, Iterator, Sequence

from popauth.basics.errors import InputError, UnavailableError
from popauth.doors.ingest import wire

# A connection refused for a full listen queue (EAGAIN) or a busy endpoint
# is retried once, this much later, within the same deadline.
_RETRY_DELAY = 0.1
_BUSY_ERRNOS = frozenset({errno.EAGAIN, errno.ECONNREFUSED})


class IngestUnreachable(UnavailableError, OSError):
    """The endpoint is missing, refused, or did not answer in time."""


class UnsafeRequest(InputError):
    """A request with a control character (a line break could smuggle in a
    second request); nothing was sent."""


def check_request(line: str) -> str:
    """``line`` if it holds no control character; UnsafeRequest otherwise."""
    if wire.has_control_characters(line):
        raise UnsafeRequest(f"control characters are not allowed in a request: {line!r}")
    return line


class IngestClient:
    def __init__(self, path: str, timeout: float = 2.0) -> None:
        self._path = path
        self._timeout = timeout

    def request(self, line: str) -> list[str]:
        """Send one request and return its reply lines (several for LIST)."""
        check_request(line)
        deadline = time.monotonic() + self._timeout
        is_list = wire.is_multi_line(line)
        reply = self._exchange(line, deadline, is_list)
        if reply[0].startswith(wire.BUSY_PREFIX) and self._pause_for_retry(deadline):
            reply = self._exchange(line, deadline, is_list)
        return reply

    def _pause_for_retry(self, deadline: float) -> bool:
        if time.monotonic() + _RETRY_DELAY >= deadline:
            return False
        time.sleep(_RETRY_DELAY)
        return True

    def _connect(self, deadline: float) -> socket.socket:
        """A connection to the endpoint, retried once when it is momentarily full."""
        for attempt in (1, 2):
            connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            connection.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                connection.connect(self._path)
            except FileNotFoundError:
                connection.close()
                raise IngestUnreachable(
                    f"no socket at {self._path} (is popauth running?)"
                ) from None
            except OSError as error:
                connection.close()
                if attempt == 1 and error.errno in _BUSY_ERRNOS and self._pause_for_retry(deadline):
                    continue
                raise
            return connection
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def _talking(self, deadline: float, timed_out: Callable[[], str]) -> Iterator[socket.socket]:
        """A connection for one exchange, its failures as IngestUnreachable;
        ``timed_out`` says what was missing when the deadline passed."""
        connection: socket.socket | None = None
        try:
            connection = self._connect(deadline)
            yield connection
        except TimeoutError:
            raise IngestUnreachable(timed_out()) from None
        except IngestUnreachable:
            raise
        except OSError as error:
            raise self._cannot_talk(error) from None
        finally:
            if connection is not None:
                connection.close()

    def _exchange(self, line: str, deadline: float, is_list: bool) -> list[str]:
        with self._talking(
            deadline, lambda: f"no answer from {self._path} within {self._timeout}s"
        ) as connection:
            connection.sendall(line.encode() + b"\n")
            return self._read_reply(connection, deadline, is_list)

    def request_many(self, lines: Sequence[str], window: int = 256) -> list[str]:
        """Send requests with one-line replies over one connection; their replies.

        Up to ``window`` requests are in flight at a time, so neither side's
        socket buffer can fill while the other waits. The whole batch has
        the client's timeout.
        """
        for line in lines:
            check_request(line)
        deadline = time.monotonic() + self._timeout
        replies: list[str] = []
        with self._talking(
            deadline,
            lambda: (
                f"{len(replies)} of {len(lines)} replies from {self._path} within {self._timeout}s"
            ),
        ) as connection:
            buffer = b""
            for start in range(0, len(lines), window):
                in_flight = lines[start : start + window]
                connection.settimeout(max(0.001, deadline - time.monotonic()))
                connection.sendall("".join(f"{line}\n" for line in in_flight).encode())
                expected = len(replies) + len(in_flight)
                while len(replies) < expected:
                    while b"\n" not in buffer:
                        data = self._receive(connection, deadline)
                        if not data:
                            last = f": {replies[-1]}" if replies else ""
                            raise IngestUnreachable(
                                f"{self._path} closed the connection after "
                                f"{len(replies)} of {len(lines)} replies{last}"
                            )
                        buffer += data
                    raw, buffer = buffer.split(b"\n", 1)
                    replies.append(raw.decode("utf-8", "replace"))
            return replies

    def _cannot_talk(self, error: OSError) -> IngestUnreachable:
        return IngestUnreachable(f"cannot talk to {self._path}: {error.strerror or error}")

    @staticmethod
    def _receive(connection: socket.socket, deadline: float) -> bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        connection.settimeout(remaining)
        return connection.recv(65536)

    @staticmethod
    def _read_reply(connection: socket.socket, deadline: float, is_list: bool) -> list[str]:
        buffer = b""
        lines: list[str] = []
        expected = 1
        while len(lines) < expected:
            while b"\n" not in buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                connection.settimeout(remaining)
                chunk = connection.recv(65536)
                if not chunk:
                    raise IngestUnreachable("endpoint closed the connection mid-reply")
                buffer += chunk
            raw, buffer = buffer.split(b"\n", 1)
            lines.append(raw.decode("utf-8", "replace"))
            count = wire.announced_count(lines[0]) if is_list and len(lines) == 1 else None
            if count is not None:
                expected += count
        return lines
