"""Unexpected failures and unwritable state, over real UNIX sockets.

Every request gets exactly one reply: ``ERR internal`` (ingest) or ``TEMP``
(socketmap) for a failure nobody foresaw, logged with its traceback, and the
door goes on serving. A block list that cannot be written changes nothing
and says so.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
from structlog.testing import CapturingLogger

from popauth.basics.addresses import IPAddress, WhitelistKeying, parse_client_address
from popauth.config import IngestSettings, SocketmapSettings
from popauth.doors.ingest.server import IngestServer, PeerPolicy
from popauth.doors.socketmap import codec
from popauth.doors.socketmap.server import SocketmapServer
from popauth.store import GrantOutcome
from popauth.store.accounts import BlockListUnwritable, FileBlockList, UsageLedger
from popauth.store.memory import MemoryStore
from popauth.telemetry.metrics import Metrics
from tests.support.clock import FakeClock
from tests.support.logs import capturing_logger

A = parse_client_address("192.0.2.1")


class BrokenStore(MemoryStore):
    """A store with a bug: every grant of ``bug@`` users raises."""

    def grant(self, address: IPAddress, user: str) -> GrantOutcome:
        if user.startswith("bug@"):
            raise KeyError("a bug in the store")
        return super().grant(address, user)


class BrokenBlockingStore(BrokenStore):
    """The same bug in a store called off the event loop (like Redis)."""

    may_block: ClassVar[bool] = True


class BrokenLedger(UsageLedger):
    def pop_first_users(self) -> list[tuple[str, object]]:  # type: ignore[override]
        raise ZeroDivisionError("a bug in the ledger")


class Door:
    def __init__(
        self,
        directory: Path,
        store_class: type[MemoryStore] = BrokenStore,
        blocklist_path: Path | None = None,
    ) -> None:
        self.path = directory / "ingest.sock"
        clock = FakeClock()
        self.blocklist = FileBlockList(blocklist_path or directory / "blocked.json")
        self.store = store_class(
            ttl=900, max_entries=100, clock=clock, is_blocked=self.blocklist.__contains__
        )
        self.log, self.sink = capturing_logger()
        self.server = IngestServer(
            settings=IngestSettings(socket=self.path, socket_mode=0o600, timeout=5),
            store=self.store,
            keying=WhitelistKeying(128),
            peers=PeerPolicy.of([], []),
            blocklist=self.blocklist,
            ledger=BrokenLedger(max_users=10, clock=clock),
            metrics=Metrics(),
            log=self.log,
        )

    def exchange(self, lines: list[bytes]) -> list[bytes]:
        """Send every line on one connection; every reply line until the server closes."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(5)
            connection.connect(str(self.path))
            connection.sendall(b"".join(lines))
            connection.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := connection.recv(4096):
                data += chunk
        return data.splitlines()


@pytest.fixture(params=[BrokenStore, BrokenBlockingStore], ids=["in-loop", "off-loop"])
def door(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Door]:
    served = Door(tmp_path, request.param)
    served.server.start()
    yield served
    served.server.stop()


def tracebacks(sink: CapturingLogger, event: str) -> list[str]:
    """Every logged ``event`` that carries its exception."""
    return [
        str(call.kwargs.get("exc_info"))
        for call in sink.calls
        if (call.args[0] if call.args else call.kwargs.get("event")) == event
        and call.kwargs.get("exc_info")
    ]


def test_a_failing_store_gets_one_err_internal_and_the_connection_goes_on(door: Door) -> None:
    replies = door.exchange(
        [b"LOGIN 192.0.2.1 bug@example.org\n", b"LOGIN 192.0.2.2 alice\n", b"PING\n"]
    )
    assert len(replies) == 3, replies
    assert replies[0].startswith(b"ERR internal ")
    assert replies[1].startswith(b"OK address=192.0.2.2 user=alice")
    assert replies[2] == b"OK pong"
    assert len(tracebacks(door.sink, "ingest_internal_error")) == 1
    assert door.store.lookup(A) is None


def test_a_failing_ledger_gets_one_err_internal(door: Door) -> None:
    replies = door.exchange([b"REPORT\n", b"PING\n"])
    assert replies == [replies[0], b"OK pong"]
    assert replies[0].startswith(b"ERR internal ")
    assert len(tracebacks(door.sink, "ingest_internal_error")) == 1


class BrokenKeying(WhitelistKeying):
    """Keying with a bug for one address (outside the store call)."""

    def key_address(self, address: IPAddress) -> IPAddress:
        if address == A:
            raise IndexError("a bug in the keying")
        return super().key_address(address)


@pytest.mark.parametrize("blocking", [False, True], ids=["in-loop", "off-loop"])
def test_a_socketmap_failure_gets_one_temp_and_the_connection_goes_on(
    tmp_path: Path, blocking: bool
) -> None:
    store_class = BrokenBlockingStore if blocking else BrokenStore
    store = store_class(ttl=900, max_entries=10, clock=FakeClock())
    store.grant(parse_client_address("192.0.2.2"), "alice")
    log, sink = capturing_logger()
    path = tmp_path / "socketmap.sock"
    server = SocketmapServer(
        path=path,
        settings=SocketmapSettings(socket_mode=0o600),
        store=store,
        keying=BrokenKeying(128),
        metrics=Metrics(),
        log=log,
        lookup_events=True,
    )
    server.start()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(5)
            connection.connect(str(path))
            connection.sendall(
                codec.encode(b"popauth 192.0.2.1") + codec.encode(b"popauth 192.0.2.2")
            )
            connection.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := connection.recv(4096):
                data += chunk
        first = codec.decode(data, 1000)
        assert first is not None
        assert first[0].startswith(b"TEMP ")
        second = codec.decode(first[1], 1000)
        assert second == (b"OK OK", b"")
        assert len(tracebacks(sink, "request_failed")) == 1
    finally:
        server.stop()


# --- a block list that cannot be written -----------------------------------


def make_unwritable(path: Path) -> None:
    """Make ``path``'s directory a regular file: no file can be written there."""
    if path.parent.exists():
        for leftover in path.parent.iterdir():
            leftover.unlink()
        path.parent.rmdir()
    path.parent.write_text("")


def test_failed_block_list_write_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "state" / "blocked.json"
    blocks = FileBlockList(path)
    make_unwritable(path)
    with pytest.raises(BlockListUnwritable, match="block list not saved"):
        blocks.add("mallory")
    assert "mallory" not in blocks
    assert blocks.users() == []


def test_block_that_cannot_be_saved_is_refused_and_revokes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "state" / "blocked.json"
    door = Door(tmp_path, MemoryStore, blocklist_path=path)
    make_unwritable(path)
    door.server.start()
    try:
        replies = door.exchange(
            [b"LOGIN 192.0.2.1 mallory\n", b"BLOCK mallory\n", b"BLOCKED\n", b"QUERY 192.0.2.1\n"]
        )
        assert replies[0].startswith(b"OK ")
        assert replies[1] == b"ERR unavailable block list cannot be saved, nothing changed"
        assert replies[2] == b"OK count=0"
        # Not half done: the entry of the user who is not blocked stays.
        assert replies[3].startswith(b"OK address=192.0.2.1 user=mallory")
        failures = [
            call.kwargs
            for call in door.sink.calls
            if call.kwargs.get("event") == "blocklist_write_failed"
        ]
        assert len(failures) == 1
        assert failures[0]["verb"] == "BLOCK"
        assert failures[0]["user"] == "mallory"
    finally:
        door.server.stop()


def test_unblock_that_cannot_be_saved_keeps_the_block(tmp_path: Path) -> None:
    path = tmp_path / "state" / "blocked.json"
    FileBlockList(path).add("mallory")
    door = Door(tmp_path, MemoryStore, blocklist_path=path)
    door.server.start()
    try:
        make_unwritable(path)
        replies = door.exchange([b"UNBLOCK mallory\n", b"LOGIN 192.0.2.1 mallory\n"])
        assert replies[0].startswith(b"ERR unavailable ")
        assert replies[1] == b"ERR blocked user mallory is blocked"
    finally:
        door.server.stop()
