"""An ingest endpoint served in-process over a real UNIX socket, for tests."""

from __future__ import annotations

import socket
from pathlib import Path

from popauth.accounts import FileBlockList, UsageLedger
from popauth.addresses import WhitelistKeying
from popauth.client import IngestClient
from popauth.ingest.server import IngestLimits, IngestServer, PeerPolicy
from popauth.metrics import Metrics
from popauth.store.memory import MemoryStore
from tests.support.clock import FakeClock
from tests.support.logs import capturing_logger


class Endpoint:
    def __init__(
        self,
        directory: Path,
        peers: PeerPolicy | None = None,
        store_class: type[MemoryStore] = MemoryStore,
        **limits: float,
    ) -> None:
        self.path = directory / "ingest.sock"
        self.clock = FakeClock()
        self.blocklist = FileBlockList(directory / "blocked.json")
        self.store = store_class(
            ttl=900, max_entries=1000, clock=self.clock, is_blocked=self.blocklist.__contains__
        )
        self.log, self.sink = capturing_logger()
        self.ledger = UsageLedger(max_users=100, clock=self.clock)
        self.metrics = Metrics()
        self.server = IngestServer(
            path=self.path,
            mode=0o666,
            group="",
            store=self.store,
            keying=WhitelistKeying(64),
            peers=peers or PeerPolicy.of([], []),
            limits=IngestLimits(**limits),  # type: ignore[arg-type]
            blocklist=self.blocklist,
            ledger=self.ledger,
            metrics=self.metrics,
            log=self.log,
        )

    def ask(self, line: str) -> list[str]:
        return IngestClient(str(self.path), timeout=5).request(line)

    def raw(self) -> socket.socket:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.settimeout(5)
        connection.connect(str(self.path))
        return connection
