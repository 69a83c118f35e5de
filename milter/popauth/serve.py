"""``popauth serve``: build every piece from the settings and run them together.

libmilter owns the main thread and the termination signals, so the ingest
endpoint runs in its own thread and is stopped once the milter returns.
"""

from __future__ import annotations

import signal
from pathlib import Path

import structlog

from popauth.adapter import RelayMilter, run_milter
from popauth.addresses import WhitelistKeying
from popauth.clock import Clock, SystemClock
from popauth.config import Settings
from popauth.gate import RelayGate
from popauth.ingest.server import IngestLimits, IngestServer, PeerPolicy
from popauth.logs import configure_logging
from popauth.sockets import clear_stale_socket, prepare_directory, remove_socket, set_permissions
from popauth.store import WhitelistStore
from popauth.store.memory import MemoryStore
from popauth.store.snapshot import Snapshotter

TERMINATION_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def open_store(
    settings: Settings, clock: Clock, log: structlog.typing.FilteringBoundLogger
) -> tuple[WhitelistStore, Snapshotter | None]:
    """The configured store, and the snapshotter that keeps an embedded one."""
    if settings.store == "redis":
        from popauth.store.redis import RedisStore

        redis_store = RedisStore(
            url=settings.redis_url,
            ttl=settings.ttl,
            timeout=settings.redis_timeout,
            key_prefix=settings.redis_key_prefix,
            clock=clock,
        )
        if not redis_store.ping():
            # Not fatal: lookups fail closed until Redis answers.
            log.error("redis_unavailable_at_start", url=settings.redis_url)
        return redis_store, None
    memory = MemoryStore(ttl=settings.ttl, max_entries=settings.max_entries, clock=clock)
    if not settings.snapshot_path:
        return memory, None
    snapshotter = Snapshotter(
        store=memory,
        path=Path(settings.snapshot_path),
        interval=settings.snapshot_interval,
        clock=clock,
        log=log,
    )
    snapshotter.restore()
    return memory, snapshotter


def serve(settings: Settings) -> None:
    log = configure_logging(settings.log_format, settings.log_level)
    keying = WhitelistKeying(settings.ipv6_prefix)
    store, snapshotter = open_store(settings, SystemClock(), log)
    policy = settings.relay_policy()
    if not policy.local_domains:
        log.warning("no_local_domains", hint="every recipient counts as relayed; set local_domains")
    gate = RelayGate(policy=policy, store=store, keying=keying, log=log)
    ingest = IngestServer(
        path=settings.ingest_socket_path(),
        mode=settings.ingest_socket_mode,
        group=settings.ingest_socket_group,
        store=store,
        keying=keying,
        peers=PeerPolicy.of(settings.ingest_allowed_users, settings.ingest_allowed_groups),
        limits=IngestLimits(settings.ingest_timeout, settings.ingest_max_clients),
        log=log,
    )
    milter_path = settings.milter_socket_path()
    if milter_path is not None:
        prepare_directory(milter_path)
        clear_stale_socket(milter_path)

    def on_ready() -> None:
        if milter_path is not None:
            set_permissions(milter_path, settings.milter_socket_mode, settings.milter_socket_group)
        log.info(
            "listening",
            milter_socket=settings.milter_socket,
            ingest_socket=settings.ingest_socket,
            ttl=settings.ttl,
            store=settings.store,
        )

    # libmilter stops on these signals by sigwait() in a thread of its own. Any
    # thread that leaves them unblocked could receive them instead and die
    # or swallow them, so block them before the first thread starts; one
    # that arrives before libmilter is listening waits pending for it.
    signal.pthread_sigmask(signal.SIG_BLOCK, TERMINATION_SIGNALS)
    ingest.start()
    if snapshotter is not None:
        snapshotter.start()
    try:
        run_milter(
            name=settings.milter_name,
            spec=settings.milter_socket,
            timeout=settings.milter_timeout,
            factory=lambda: RelayMilter(gate, settings.reject_message, log),
            on_ready=on_ready,
        )
    finally:
        ingest.stop()
        if snapshotter is not None:
            snapshotter.stop()
        store.close()
        if milter_path is not None:
            remove_socket(milter_path)
        log.info("stopped")
