"""``popauth serve``: build every piece from the settings and run them together.

Each piece is a component with a start and a stop (:mod:`popauth.daemon.lifecycle`):
the store (restored from disk), the saver, the ingest endpoint, the
socketmap, the policy door, the metrics endpoint, the notice worker and the
milter, started in that order and stopped in reverse, so the last snapshot
is written after every door has closed.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import structlog

from popauth.basics.addresses import IPAddress, WhitelistKeying
from popauth.basics.clock import Clock, SystemClock
from popauth.basics.errors import StateFileError, StateFileMissing
from popauth.config import Settings
from popauth.daemon.lifecycle import Lifecycle, Step, Stopped
from popauth.daemon.notices import notice_worker
from popauth.daemon.settings_reload import SettingsChangeCheck
from popauth.doors.ingest.server import IngestServer
from popauth.doors.milter.adapter import RelayMilter, Replies
from popauth.doors.milter.service import MilterService
from popauth.doors.policy.server import PolicyServer
from popauth.doors.socketmap.server import SocketmapServer
from popauth.localdelivery.reload import LocalDeliveryReloader, log_local_delivery
from popauth.localdelivery.resolve import resolve_local_delivery
from popauth.relay.decision import Campaign
from popauth.relay.explain import Explainer
from popauth.relay.gate import RelayGate
from popauth.store import Entry, StoreKind, StoreSetupError, StoreUnavailable, WhitelistStore
from popauth.store.accounts import (
    BlockList,
    FileBlockList,
    FileGraduates,
    Graduates,
    RedisBlockList,
    RedisGraduates,
    UsageLedger,
)
from popauth.store.memory import MemoryStore
from popauth.store.pacing import SWITCH_INTERVAL
from popauth.store.snapshot import Snapshotter
from popauth.store.statefile import PeriodicSaver, prepare_state_directory
from popauth.telemetry.levels import LogLevel
from popauth.telemetry.logs import configure_logging
from popauth.telemetry.metrics import POP_FIRST_WINDOWS, CampaignGauges, Metrics


@dataclass
class State:
    """The whitelist and the account books, and how to restore and save what is local."""

    store: WhitelistStore
    blocklist: BlockList
    ledger: UsageLedger
    graduates: Graduates = field(default_factory=lambda: FileGraduates(None))
    restores: list[Callable[[], None]] = field(default_factory=list)
    saves: list[Callable[[], None]] = field(default_factory=list)

    def restore(self) -> None:
        for restore in self.restores:
            restore()


def state_file_paths(settings: Settings) -> list[Path]:
    """Every state file popauth will write with these settings."""
    paths = [settings.accounts.usage_path]
    if settings.store.kind is StoreKind.MEMORY:
        paths += [
            settings.store.snapshot_path,
            settings.accounts.blocklist_path,
            settings.accounts.graduates_path,
        ]
        if settings.notices.enabled:
            paths.append(settings.notices.path)
    return [path for path in paths if path is not None]


def open_state(
    settings: Settings, clock: Clock, log: structlog.typing.FilteringBoundLogger
) -> State:
    """The configured store and books, read from disk by ``State.restore``.

    Raises StateDirectoryUnsafe (popauth does not start) when a state file's
    directory could be written by others than root and popauth's own user,
    and StoreSetupError when Redis may evict the block list.
    """
    for path in state_file_paths(settings):
        prepare_state_directory(path)
    ledger = UsageLedger(max_users=settings.accounts.usage_max_users, clock=clock)
    stored = settings.store
    if stored.kind is StoreKind.REDIS:
        from popauth.store.redis import RedisStore, connect

        redis_store = RedisStore(
            client=connect(
                stored.redis_url, stored.redis_timeout, stored if stored.redis_sentinels else None
            ),
            ttl=settings.store.ttl,
            key_prefix=settings.store.redis_key_prefix,
            clock=clock,
            wait_replicas=settings.store.redis_wait_replicas,
            wait_timeout=settings.store.redis_wait_timeout,
            max_users_per_address=stored.max_users_per_address,
        )
        try:
            problem = redis_store.eviction_policy_problem()
        except StoreUnavailable as failure:
            # Not fatal: lookups fail closed until Redis answers, and logins
            # until its eviction policy has been checked.
            log.error(
                "redis_unavailable_at_start",
                url=settings.store.redis_url,
                sentinels=list(settings.store.redis_sentinels),
                error=str(failure),
            )
        else:
            if problem is not None:
                log.error("redis_unsuitable", reason=problem)
                redis_store.close()
                raise StoreSetupError(problem)
        blocks = RedisBlockList(redis_store.client, redis_store.blocklist_key)
        graduates: Graduates = RedisGraduates(redis_store.client, redis_store.graduates_key)
        state = State(redis_store, blocks, ledger, graduates)
    else:
        blocklist = FileBlockList(settings.accounts.blocklist_path, log)
        memory = MemoryStore(
            ttl=stored.ttl,
            max_entries=stored.max_entries,
            max_users_per_address=stored.max_users_per_address,
            clock=clock,
            is_blocked=blocklist.__contains__,
        )
        state = State(
            memory, blocklist, ledger, FileGraduates(settings.accounts.graduates_path, log)
        )
        if stored.snapshot_path is not None:
            snapshotter = Snapshotter(store=memory, path=stored.snapshot_path, clock=clock, log=log)
            state.restores.append(snapshotter.restore)
            state.saves.append(snapshotter.save)
    usage_path = settings.accounts.usage_path
    if usage_path is not None:

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


def socketmap_server(
    settings: Settings,
    store: WhitelistStore,
    keying: WhitelistKeying,
    metrics: Metrics,
    log: structlog.typing.FilteringBoundLogger,
    *,
    gate: RelayGate | None = None,
) -> SocketmapServer | None:
    """The socketmap door, when ``socketmap_socket`` is set; ``gate`` says
    which listed addresses POP-first no longer relays (retired, graduated)."""
    if settings.socketmap.socket is None:
        return None

    def refusal(address: IPAddress, grant: Entry) -> str | None:
        decision = None if gate is None else gate.address_refusal(address, grant)
        return None if decision is None else decision.reason.value

    return SocketmapServer(
        path=settings.socketmap.socket,
        settings=settings.socketmap,
        store=store,
        keying=keying,
        metrics=metrics,
        log=log,
        lookup_events=settings.log.level is LogLevel.DEBUG,
        refusal=refusal,
    )


DAY = 86_400.0


def campaign_gauges(
    ledger: UsageLedger, graduates: Graduates, campaign: Callable[[], Campaign]
) -> CampaignGauges:
    """The phase-out's gauges now: users still on POP first, graduated, exempt."""
    now = time.time()
    users = {days: ledger.pop_first_users_since(now - days * DAY) for days in POP_FIRST_WINDOWS}
    try:
        graduated: int | None = sum(r.graduated for r in graduates.records().values())
    except StoreUnavailable:
        graduated = None
    return CampaignGauges(users, graduated, len(campaign().exempt_users))


def policy_server(
    settings: Settings,
    *,
    gate: RelayGate,
    replies: Replies,
    blocking_calls: bool,
    metrics: Metrics,
    log: structlog.typing.FilteringBoundLogger,
) -> PolicyServer | None:
    """The Postfix policy door, when ``policy_socket`` is set."""
    if settings.policy.socket is None:
        return None
    return PolicyServer(
        path=settings.policy.socket,
        settings=settings.policy,
        gate=gate,
        replies=replies,
        metrics=metrics,
        log=log,
        blocking_calls=blocking_calls,
    )


def serve(settings: Settings, settings_path: Path | None = None) -> Stopped:
    """Run popauth until SIGTERM or SIGINT; a start failure is raised after rollback.

    ``settings_path`` is the file ``settings`` came from: a reload compares it.
    """
    sys.setswitchinterval(SWITCH_INTERVAL)
    log = configure_logging(settings.log.format, settings.log.level)
    # First: without local domains and mailers nothing else is worth starting.
    local = resolve_local_delivery(settings.local)
    log_local_delivery(log, "local_delivery", local)
    lifecycle = Lifecycle(log)
    keying = settings.store.keying
    state = open_state(settings, SystemClock(), log)
    store = state.store
    metrics = Metrics()
    metrics.track_whitelist_size(lambda: store.stats().entries)
    saver = PeriodicSaver(interval=settings.store.snapshot_interval, saves=state.saves, log=log)
    policy = settings.relay.policy(local)
    if not any(learned.has_domains() for learned in local.classes):
        log.warning("no_local_domains", hint="every recipient counts as relayed; set local_domains")
    notices = notice_worker(
        settings, local=local, store=store, metrics=metrics, log=log, usage=state.ledger
    )
    gate = RelayGate(
        policy=policy,
        store=store,
        keying=keying,
        ledger=state.ledger,
        accounting=settings.accounts.accounting,
        metrics=metrics,
        log=log,
        graduates=state.graduates,
        pop_first_relayed=None if notices is None else notices.offer,
    )
    # SIGHUP: learn local delivery again; the gate's policy is swapped whole.
    reloader = LocalDeliveryReloader(settings.local, gate, settings.relay.policy, log)
    lifecycle.on_reload("local_delivery", reloader, reloader.cancel)
    lifecycle.on_reload("settings", SettingsChangeCheck(settings_path, settings, log))
    replies = Replies(
        settings.relay.reject_message,
        settings.relay.pop_first_retired_message,
        settings.relay.pop_first_sender_message,
        settings.relay.pop_first_null_sender_message,
        settings.relay.pop_first_graduated_message,
        budget_spent=settings.relay.pop_first_budget_message,
    )
    explainer = Explainer(
        gate=gate,
        store=store,
        keying=keying,
        blocked=state.blocklist,
        replies=replies,
        clock=SystemClock(),
    )
    ingest = IngestServer(
        settings=settings.ingest,
        store=store,
        keying=keying,
        blocklist=state.blocklist,
        ledger=state.ledger,
        metrics=metrics,
        log=log,
        explainer=explainer,
        graduates=state.graduates,
        campaign=lambda: gate.policy.campaign,
        notice_history=None if notices is None else notices.history,
        budgets=gate.budget_use,
    )
    metrics.track_campaign(
        partial(campaign_gauges, state.ledger, state.graduates, lambda: gate.policy.campaign)
    )
    socketmap = socketmap_server(settings, store, keying, metrics, log, gate=gate)
    policy_door = policy_server(
        settings,
        gate=gate,
        replies=replies,
        blocking_calls=store.may_block,
        metrics=metrics,
        log=log,
    )
    milter = MilterService(
        settings=settings.milter,
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
    if policy_door is not None:
        steps.append(Step("policy", policy_door.start, policy_door.stop))
    metrics_address = settings.metrics.listen
    if metrics_address is not None:
        steps.append(
            Step(
                "metrics",
                lambda: metrics.serve(metrics_address.host, metrics_address.port),
                metrics.stop,
            )
        )
    if notices is not None:
        # Before the milter, so that it takes users from the first message on.
        steps.append(Step("notices", notices.start, notices.stop))
    steps.append(Step("milter", milter.start, milter.stop))
    log.info(
        "starting",
        milter_socket=settings.milter.socket,
        ingest_socket=str(settings.ingest.socket),
        socketmap_socket=settings.socketmap.socket and str(settings.socketmap.socket),
        policy_socket=settings.policy.socket and str(settings.policy.socket),
        metrics=settings.metrics.listen and str(settings.metrics.listen),
        ttl=settings.store.ttl,
        store=settings.store.kind.value,
    )
    return lifecycle.run(steps)
