"""An ingest endpoint served in-process over a real UNIX socket, for tests."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

from popauth.basics.addresses import WhitelistKeying
from popauth.config import IngestSettings, settings_from_mapping
from popauth.doors.ingest.client import IngestClient
from popauth.doors.ingest.server import IngestServer, PeerPolicy
from popauth.localdelivery import LocalDelivery
from popauth.notices.ledger import NoticeHistory
from popauth.relay.accounting import Accounting
from popauth.relay.decision import Campaign
from popauth.relay.explain import Explainer
from popauth.relay.gate import RelayGate
from popauth.relay.replies import Replies
from popauth.store.accounts import FileBlockList, FileGraduates, UsageLedger
from popauth.store.memory import MemoryStore
from popauth.telemetry.metrics import Metrics
from tests.support.clock import FakeClock
from tests.support.logs import capturing_logger


class Endpoint:
    def __init__(
        self,
        directory: Path,
        peers: PeerPolicy | None = None,
        store_class: type[MemoryStore] = MemoryStore,
        campaign: Campaign | None = None,
        notice_history: Callable[[], dict[str, NoticeHistory]] | None = None,
        *,
        budgets: bool = False,
        **limits: float,
    ) -> None:
        """``budgets``: QUERY shows the gate's relay budget (the default one)."""
        self.path = directory / "ingest.sock"
        self.clock = FakeClock()
        self.blocklist = FileBlockList(directory / "blocked.json")
        self.store = store_class(
            ttl=900, max_entries=1000, clock=self.clock, is_blocked=self.blocklist.__contains__
        )
        self.log, self.sink = capturing_logger()
        self.ledger = UsageLedger(max_users=100, clock=self.clock)
        self.graduates = FileGraduates(directory / "graduates.json")
        self.metrics = Metrics()
        keying = WhitelistKeying(64)
        relay = settings_from_mapping({}).relay
        self.gate = gate = RelayGate(
            policy=relay.policy(LocalDelivery.configured(["local.test"], ["local"])),
            store=self.store,
            keying=keying,
            ledger=self.ledger,
            accounting=Accounting.MESSAGES,
            metrics=self.metrics,
            log=self.log,
        )
        explainer = Explainer(
            gate=gate,
            store=self.store,
            keying=keying,
            blocked=self.blocklist,
            replies=Replies(relay.reject_message, relay.pop_first_retired_message),
            clock=self.clock,
        )
        self.server = IngestServer(
            settings=IngestSettings(
                socket=self.path,
                socket_mode=0o666,
                **limits,  # type: ignore[arg-type]
            ),
            store=self.store,
            keying=keying,
            peers=peers or PeerPolicy.of([], []),
            blocklist=self.blocklist,
            ledger=self.ledger,
            metrics=self.metrics,
            log=self.log,
            explainer=explainer,
            graduates=self.graduates,
            campaign=lambda: campaign or Campaign(),
            clock=self.clock,
            notice_history=notice_history,
            budgets=gate.budget_use if budgets else None,
        )

    def ask(self, line: str) -> list[str]:
        return IngestClient(str(self.path), timeout=5).request(line)

    def raw(self) -> socket.socket:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.settimeout(5)
        connection.connect(str(self.path))
        return connection
