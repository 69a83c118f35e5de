"""What the in-process tests of the doors the MTA asks (socketmap, policy) share.

A store whose lookups fail on demand, a persistent client (each MTA process
keeps one connection open), and serving a door for the length of a block.
"""

from __future__ import annotations

import abc
import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar, Protocol, Self, TypeVar

from popauth.basics.addresses import IPAddress
from popauth.doors.unixserver import UnixStreamServer
from popauth.store import Entry, StoreUnavailable
from popauth.store.memory import MemoryStore


class FlakyStore(MemoryStore):
    """A memory store whose lookups fail while ``down`` is set."""

    down = False

    def lookup(self, address: IPAddress) -> Entry | None:
        if self.down:
            raise StoreUnavailable("redis is down")
        return super().lookup(address)


class BlockingStore(FlakyStore):
    may_block: ClassVar[bool] = True


class PersistentClient(abc.ABC):
    """One connection, asked request after request; a door's framing is its own."""

    def __init__(self, path: Path) -> None:
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.socket.settimeout(5)
        self.socket.connect(str(path))
        self.buffer = b""

    @abc.abstractmethod
    def frame(self, payload: bytes) -> bytes:
        """``payload`` as one request on the wire."""

    @abc.abstractmethod
    def split_reply(self, buffer: bytes) -> tuple[bytes, bytes] | None:
        """The first reply in ``buffer`` and the rest, or None until it is complete."""

    def send(self, raw: bytes) -> None:
        self.socket.sendall(raw)

    def reply(self) -> bytes:
        while (split := self.split_reply(self.buffer)) is None:
            chunk = self.socket.recv(4096)
            if not chunk:
                raise ConnectionError("closed")
            self.buffer += chunk
        reply, self.buffer = split
        return reply

    def ask(self, payload: bytes) -> bytes:
        self.send(self.frame(payload))
        return self.reply()

    def closed(self) -> bool:
        return self.buffer == b"" and self.socket.recv(100) == b""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.socket.close()


class ServesADoor(Protocol):
    @property
    def server(self) -> UnixStreamServer: ...


Served = TypeVar("Served", bound=ServesADoor)


@contextlib.contextmanager
def serving(endpoint: Served) -> Iterator[Served]:
    """``endpoint`` with its door started, stopped again at the end of the block."""
    endpoint.server.start()
    try:
        yield endpoint
    finally:
        endpoint.server.stop()
