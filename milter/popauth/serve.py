"""``popauth serve``: build every piece from the settings and run them together.

Each piece is a component with a start and a stop (:mod:`popauth.lifecycle`):
the store (restored from disk), the saver, the ingest endpoint, the
socketmap, the metrics endpoint and the milter, started in that order and
stopped in reverse, so the last snapshot is written after every door has
closed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from popauth.accounts import BlockList, FileBlockList, RedisBlockList, UsageLedger
from popauth.adapter import RelayMilter, Replies
from popauth.addresses import WhitelistKeying
from popauth.clock import Clock, SystemClock
from popauth.config import Settings
from popauth.gate import Accounting, RelayGate
from popauth.ingest.roles import PeerPolicy
from popauth.ingest.server import IngestLimits, IngestServer
from popauth.lifecycle import Lifecycle, Step, Stopped
from popauth.localdelivery.reload import LocalDeliveryReloader, log_local_delivery
from popauth.localdelivery.resolve import resolve_local_delivery
from popauth.logs import configure_logging
from popauth.metrics import Metrics
from popauth.milter_service import MilterService
from popauth.persistence import (
    PeriodicSaver,
    StateFileError,
    StateFileMissing,
    prepare_state_directory,
)
from popauth.socketmap.server import SocketmapLimits, SocketmapServer
from popauth.store import WhitelistStore
from popauth.store.memory import MemoryStore
from popauth.store.snapshot import Snapshotter

if TYPE_CHECKING:
    from popauth.store.redis import SentinelSettings


@dataclass
class State:
    """The whitelist and the account books, and how to restore and save what is local."""

    store: WhitelistStore
    blocklist: BlockList
    ledger: UsageLedger
    restores: list[Callable[[], None]] = field(default_factory=list)
    saves: list[Callable[[], None]] = field(default_factory=list)

    def restore(self) -> None:
        for restore in self.restores:
            restore()


def state_file_paths(settings: Settings) -> list[Path]:
    """Every state file popauth will write with these settings."""
    paths = [settings.usage_path]
    if settings.store == "memory":
        paths += [settings.snapshot_path, settings.blocklist_path]
    return [Path(path) for path in paths if path]


def open_state(
    settings: Settings, clock: Clock, log: structlog.typing.FilteringBoundLogger
) -> State:
    """The configured store and books, read from disk by ``State.restore``.

    Raises StateDirectoryUnsafe (popauth does not start) when a state file's
    directory could be written by others than root and popauth's own user.
    """
    for path in state_file_paths(settings):
        prepare_state_directory(path)
    ledger = UsageLedger(max_users=settings.usage_max_users, clock=clock)
    if settings.store == "redis":
        from popauth.store.redis import RedisStore, connect

        redis_store = RedisStore(
            client=connect(settings.redis_url, settings.redis_timeout, sentinel_settings(settings)),
            ttl=settings.ttl,
            key_prefix=settings.redis_key_prefix,
            clock=clock,
            wait_replicas=settings.redis_wait_replicas,
            wait_timeout=settings.redis_wait_timeout,
        )
        if not redis_store.ping():
            # Not fatal: lookups fail closed until Redis answers.
            log.error(
                "redis_unavailable_at_start",
                url=settings.redis_url,
                sentinels=list(settings.redis_sentinels),
            )
        blocks = RedisBlockList(redis_store.client, f"{settings.redis_key_prefix}blocked-users")
        state = State(redis_store, blocks, ledger)
    else:
        memory = MemoryStore(ttl=settings.ttl, max_entries=settings.max_entries, clock=clock)
        blocklist = FileBlockList(
            Path(settings.blocklist_path) if settings.blocklist_path else None, log
        )
        state = State(memory, blocklist, ledger)
        if settings.snapshot_path:
            snapshotter = Snapshotter(
                store=memory, path=Path(settings.snapshot_path), clock=clock, log=log
            )
            state.restores.append(snapshotter.restore)
            state.saves.append(snapshotter.save)
    if settings.usage_path:
        usage_path = Path(settings.usage_path)

        def load_usage() -> None:
            try:
                ledger.load(usage_path, log)
            except StateFileMissing as problem:
                log.info("usage_not_restored", path=str(usage_path), reason=str(problem))
            except StateFileError as problem:
                log.error("usage_not_restored", path=str(usage_path), reason=str(problem))

        state.restores.append(load_usage)
        state.saves.append(lambda: ledger.save(usage_path))
    return state


def sentinel_settings(settings: Settings) -> SentinelSettings | None:
    if not settings.redis_sentinels:
        return None
    from popauth.store.redis import SentinelSettings

    return SentinelSettings(
        addresses=settings.sentinel_addresses(),
        service=settings.redis_sentinel_service,
        username=settings.redis_sentinel_username,
        password=settings.redis_sentinel_password,
        tls=settings.redis_sentinel_tls,
        tls_ca_file=settings.redis_sentinel_tls_ca_file,
        tls_cert_file=settings.redis_sentinel_tls_cert_file,
        tls_key_file=settings.redis_sentinel_tls_key_file,
    )


def socketmap_server(
    settings: Settings,
    store: WhitelistStore,
    keying: WhitelistKeying,
    metrics: Metrics,
    log: structlog.typing.FilteringBoundLogger,
) -> SocketmapServer | None:
    """The socketmap door, when ``socketmap_socket`` is set."""
    if not settings.socketmap_socket:
        return None
    return SocketmapServer(
        path=Path(settings.socketmap_socket),
        mode=settings.socketmap_socket_mode,
        group=settings.socketmap_socket_group,
        store=store,
        keying=keying,
        name=settings.socketmap_name,
        ok_value=settings.socketmap_ok_value,
        limits=SocketmapLimits(
            timeout=settings.socketmap_timeout,
            idle_timeout=settings.socketmap_idle_timeout,
            max_clients=settings.socketmap_max_clients,
            max_clients_per_uid=settings.socketmap_clients_per_uid,
        ),
        metrics=metrics,
        log=log,
    )


def serve(settings: Settings) -> Stopped:
    """Run popauth until SIGTERM or SIGINT; a start failure is raised after rollback."""
    log = configure_logging(settings.log_format, settings.log_level)
    # First: without local domains and mailers nothing else is worth starting.
    local = resolve_local_delivery(settings)
    log_local_delivery(log, "local_delivery", local)
    lifecycle = Lifecycle(log)
    keying = WhitelistKeying(settings.ipv6_prefix)
    state = open_state(settings, SystemClock(), log)
    store = state.store
    metrics = Metrics()
    metrics.track_whitelist_size(lambda: store.stats().entries)
    saver = PeriodicSaver(interval=settings.snapshot_interval, saves=state.saves, log=log)
    policy = settings.relay_policy(local)
    if not policy.local_domains:
        log.warning("no_local_domains", hint="every recipient counts as relayed; set local_domains")
    gate = RelayGate(
        policy=policy,
        store=store,
        keying=keying,
        ledger=state.ledger,
        accounting=Accounting(settings.accounting),
        metrics=metrics,
        log=log,
    )
    # SIGHUP: learn local delivery again; the gate's policy is swapped whole.
    lifecycle.on_reload(
        "local_delivery", LocalDeliveryReloader(settings, gate, settings.relay_policy, log)
    )
    replies = Replies(settings.reject_message, settings.pop_first_retired_message)
    ingest = IngestServer(
        path=settings.ingest_socket_path(),
        mode=settings.ingest_socket_mode,
        group=settings.ingest_socket_group,
        store=store,
        keying=keying,
        peers=PeerPolicy.of(
            settings.ingest_allowed_users,
            settings.ingest_allowed_groups,
            operator_users=settings.ingest_operator_users,
            operator_groups=settings.ingest_operator_groups,
            administrator_users=settings.ingest_admin_users,
            administrator_groups=settings.ingest_admin_groups,
        ),
        limits=IngestLimits(
            timeout=settings.ingest_timeout,
            max_clients=settings.ingest_max_clients,
            max_clients_per_uid=settings.ingest_clients_per_uid,
            first_byte_timeout=settings.ingest_first_byte_timeout,
        ),
        blocklist=state.blocklist,
        ledger=state.ledger,
        metrics=metrics,
        log=log,
    )
    socketmap = socketmap_server(settings, store, keying, metrics, log)
    milter = MilterService(
        name=settings.milter_name,
        spec=settings.milter_socket,
        timeout=settings.milter_timeout,
        mode=settings.milter_socket_mode,
        group=settings.milter_socket_group,
        factory=lambda: RelayMilter(gate, replies, metrics, log),
        on_exit=lifecycle.stop_soon,
        log=log,
    )
    steps = [
        Step("store", state.restore, store.close),
        Step("saver", saver.start, saver.stop),
        Step("ingest", ingest.start, ingest.stop),
    ]
    if socketmap is not None:
        steps.append(Step("socketmap", socketmap.start, socketmap.stop))
    metrics_address = settings.metrics_address()
    if metrics_address is not None:
        steps.append(Step("metrics", lambda: metrics.serve(*metrics_address), metrics.stop))
    steps.append(Step("milter", milter.start, milter.stop))
    log.info(
        "starting",
        milter_socket=settings.milter_socket,
        ingest_socket=settings.ingest_socket,
        socketmap_socket=settings.socketmap_socket or None,
        metrics=settings.metrics_listen or None,
        ttl=settings.ttl,
        store=settings.store,
    )
    return lifecycle.run(steps)
