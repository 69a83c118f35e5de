"""Talk to a UNIX socket as another user, without running any file as them.

A forked child drops to the user's uid and gid and then does its socket
work, so the server sees that user in SO_PEERCRED. Nothing is executed from
the checkout, which may be in a directory only root can enter.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

# A test that acts as another user (setuid, chown) needs root, as the live
# tests do: it is marked live, so that ``-m "not live"`` runs without root,
# and a run without root stops with one line saying so (tests/conftest.py).
needs_root = pytest.mark.live


def _become(user: str, group: int | None, supplementary: Sequence[int] = ()) -> None:
    entry = pwd.getpwnam(user)
    os.setgroups(list(supplementary))
    os.setgid(entry.pw_gid if group is None else group)
    os.setuid(entry.pw_uid)


def ask_as(
    user: str,
    path: Path,
    line: str,
    *,
    group: int | None = None,
    supplementary: Sequence[int] = (),
) -> str:
    """The first reply line to ``line``, sent by a process running as ``user``
    (primary group ``group`` or the user's own, and only the ``supplementary``
    groups given)."""
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        status = 0
        try:
            os.close(reader)
            _become(user, group, supplementary)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
                connection.settimeout(10)
                connection.connect(str(path))
                connection.sendall(line.encode() + b"\n")
                reply = b""
                while b"\n" not in reply:
                    chunk = connection.recv(4096)
                    if not chunk:
                        break
                    reply += chunk
            os.write(writer, reply.split(b"\n", 1)[0] or b"(closed without a reply)")
        except BaseException as error:
            os.write(writer, f"(client failed: {error!r})".encode())
            status = 1
        finally:
            os._exit(status)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        answer = pipe.read().decode()
    os.waitpid(child, 0)
    return answer


@contextlib.contextmanager
def silent_clients_as(user: str, path: Path, count: int, *, slow: bool = False) -> Iterator[int]:
    """``count`` connections held open by a process running as ``user``.

    Silent clients connect and send nothing; slow ones send one byte and
    then nothing (a request that never ends). Whenever the server closes one,
    it is opened again at once, for as long as the block runs. Yields how
    many were connected before the block starts.
    """
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            os.close(reader)
            _become(user, None)
            _hold(path, count, slow, writer)
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        connected = int(pipe.readline() or b"0")
        try:
            yield connected
        finally:
            os.kill(child, signal.SIGTERM)
            os.waitpid(child, 0)


def _hold(path: Path, count: int, slow: bool, report: int) -> None:
    import selectors

    selector = selectors.DefaultSelector()

    def open_one() -> bool:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.setblocking(False)
        try:
            connection.connect(str(path))
            if slow:
                connection.send(b"L")
        except OSError:
            connection.close()
            return False
        selector.register(connection, selectors.EVENT_READ)
        return True

    connected = sum(open_one() for _ in range(count))
    os.write(report, f"{connected}\n".encode())
    os.close(report)
    while True:
        missing = count - len(selector.get_map())
        for _ in range(missing):
            if not open_one():
                time.sleep(0.01)  # the backlog is full: try again soon
                break
        for key, _ in selector.select(timeout=0.05):
            connection = key.fileobj
            assert isinstance(connection, socket.socket)
            try:
                data = connection.recv(4096)
            except OSError:
                data = b""
            if not data:
                selector.unregister(connection)
                connection.close()
