"""The notice worker built from the settings, and ``popauth notices --dry-run``.

The notices' own code (:mod:`popauth.notices`) knows no settings: the
retirement date, the mode of ``pop_first`` and the rest enter it here as
plain values, so that wherever the date is set, only this module reads it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import structlog

from popauth.basics.clock import Clock, SystemClock, utc_text
from popauth.basics.errors import ConfigError, StateFileError, StateFileMissing
from popauth.config import Settings
from popauth.localdelivery import LocalDelivery, is_domain_name
from popauth.notices.ledger import FileNoticeLedger, NoticeLedger, RedisNoticeLedger
from popauth.notices.mail import NoticeMail, Sendmail, notice_address, notice_values
from popauth.notices.schedule import NoticeSchedule
from popauth.notices.template import read_template
from popauth.notices.worker import NoticeOptions, NoticeWorker
from popauth.relay.decision import PopFirst
from popauth.store import StoreKind, WhitelistStore
from popauth.store.accounts import FileGraduates, RedisGraduates, UsageLedger, WeekEvent
from popauth.store.statefile import prepare_state_directory
from popauth.telemetry.metrics import Metrics

if TYPE_CHECKING:
    import redis

# Delivery classes whose domains are no mailboxes of this site's users.
_NOT_MAILBOXES = frozenset({"relay"})


def notice_schedule(settings: Settings) -> NoticeSchedule:
    retire_at = settings.relay.pop_first_retire_at
    return NoticeSchedule(
        interval=float(settings.notices.interval),
        retire_at=None if retire_at is None else retire_at.timestamp(),
        warn=settings.relay.pop_first is PopFirst.WARN,
        retired=settings.relay.pop_first is PopFirst.OFF,
    )


def first_local_domain(local: LocalDelivery) -> str | None:
    """The first plain domain the MTA delivers to mailboxes here (no pattern, no relay class)."""
    for learned in local.classes:
        if learned.rule.name in _NOT_MAILBOXES:
            continue
        for shown, _ in learned.domains:
            if is_domain_name(shown) and not shown.startswith((".", "[")):
                return shown
    return None


@dataclass(frozen=True)
class NoticeParts:
    """What the worker and the dry run share."""

    schedule: NoticeSchedule
    mail: NoticeMail
    options: NoticeOptions


def notice_parts(settings: Settings, local: LocalDelivery) -> NoticeParts:
    """Raises ConfigError when no sender address or domain can be made."""
    notices = settings.notices
    domain = notices.domain or first_local_domain(local)
    sender = notices.sender or (None if domain is None else f"postmaster@{domain}")
    if sender is None or domain is None:
        raise ConfigError(
            "pop_first_notices needs a local domain: set pop_first_notice_domain "
            "(and pop_first_notice_sender)"
        )
    # The settings checked the template at load: a file changed since fails here.
    template = read_template(notices.template)
    return NoticeParts(
        schedule=notice_schedule(settings),
        mail=NoticeMail(template, sender, sender.rpartition("@")[2]),
        options=NoticeOptions(
            instructions=notices.smtp_auth_instructions,
            domain=domain,
            queue_size=notices.queue_size,
            per_minute=notices.per_minute,
            retry=notices.retry,
        ),
    )


def notice_ledger(settings: Settings, store: WhitelistStore | None) -> NoticeLedger:
    """Redis's with a Redis store (``store`` None: connect anew), else the state file's."""
    if settings.store.kind is StoreKind.REDIS:
        from popauth.store.redis import RedisStore

        client = store.client if isinstance(store, RedisStore) else _redis_client(settings)
        return RedisNoticeLedger(client, settings.store.redis_key_prefix)
    return FileNoticeLedger(settings.notices.path)


def _redis_client(settings: Settings) -> redis.Redis:
    """A connection of its own to the store's Redis (through the sentinels, if set)."""
    from popauth.store.redis import connect

    stored = settings.store
    return connect(
        stored.redis_url, stored.redis_timeout, stored if stored.redis_sentinels else None
    )


def notice_worker(
    settings: Settings,
    *,
    local: LocalDelivery,
    store: WhitelistStore,
    metrics: Metrics,
    log: structlog.typing.FilteringBoundLogger,
    clock: Clock | None = None,
    usage: UsageLedger | None = None,
) -> NoticeWorker | None:
    """The worker when ``pop_first_notices`` is on (None otherwise); its ledger is loaded.

    ``usage``: told of every notice sent, for its weekly trend."""
    if not settings.notices.enabled:
        return None
    parts = notice_parts(settings, local)
    ledger = notice_ledger(settings, store)
    if isinstance(ledger, FileNoticeLedger) and settings.notices.path is not None:
        path = settings.notices.path
        prepare_state_directory(path)
        try:
            ledger.load()
        except StateFileMissing:
            log.info("notices_not_restored", path=str(path), reason="no such file")
        except StateFileError as problem:
            # Starting without it would tell every user again.
            raise StateFileError(f"notices {path}: {problem}") from None
    sendmail = Sendmail(settings.notices.sendmail, settings.notices.timeout)
    return NoticeWorker(
        schedule=parts.schedule,
        ledger=ledger,
        mail=parts.mail,
        submit=sendmail.submit,
        cancel=sendmail.cancel,
        options=parts.options,
        clock=clock or SystemClock(),
        metrics=metrics,
        log=log,
        sent=(lambda user: None) if usage is None else partial(usage.note, WeekEvent.NOTIFIED),
    )


def dry_run_lines(
    settings: Settings, local: LocalDelivery, now: float | None = None
) -> Iterator[str]:
    """``popauth notices --dry-run``: who would be sent a notice now, and its text.

    Reads the saved usage ledger (``usage_path``, saved every
    ``snapshot_interval``) for the users who relayed by POP-first within the
    last interval, and the notice ledger for when each was last told.
    Exempt users (POP-first does not end for them) and, with
    ``pop_first_graduate``, graduated users (it ended already) are named
    and skipped, as the milter never offers them a notice.
    Sends nothing and writes nothing.
    """
    now = time.time() if now is None else now
    parts = notice_parts(settings, local)
    schedule = parts.schedule
    if not settings.notices.enabled:
        yield "pop_first_notices is off: nothing is sent; were it on:"
    if not schedule.active(now):
        yield (
            "no notices now: they go out while pop_first relays and either "
            'pop_first_retire_at (in the future) is set or pop_first = "warn"'
        )
        return
    usage = UsageLedger(max_users=settings.accounts.usage_max_users, clock=SystemClock())
    if settings.accounts.usage_path is None:
        raise ConfigError("usage_path is off: popauth keeps no record of who relays by POP-first")
    try:
        usage.load(settings.accounts.usage_path)
    except StateFileMissing:
        yield f"no usage saved yet in {settings.accounts.usage_path}"
        return
    recent = [
        user
        for user, used in usage.pop_first_users()
        if used.pop_last_seen >= now - schedule.interval
    ]
    ledger = notice_ledger(settings, None)
    if isinstance(ledger, FileNoticeLedger):
        with contextlib.suppress(StateFileMissing):
            ledger.load()
    records = ledger.records(recent, now)
    campaign = settings.relay.campaign()
    graduated = _graduated_among(settings, tuple(recent)) if campaign.graduate else frozenset()
    due = 0
    for user in recent:
        if campaign.exempts(user):
            yield f"{user}: exempt (pop_first_exempt_users): POP-first does not end, no notice"
            continue
        if user in graduated:
            yield f"{user}: graduated to SMTP AUTH (pop_first_graduate): no notice"
            continue
        record = records.get(user)
        address = notice_address(user, parts.options.domain)
        if record is not None and not schedule.is_due(now, record.due_at):
            told, due_at = utc_text(record.sent_at), utc_text(record.due_at)
            yield f"{user}: told {told}, next notice due {due_at}"
            continue
        if address is None:
            yield f"{user}: no address can be made for this login"
            continue
        due += 1
        values = notice_values(user, schedule, parts.options.instructions, now)
        text = parts.mail.compose(address, values, now).decode("utf-8", "replace")
        yield f"{user}: would be sent a notice now, to {address}:"
        yield from ("    " + line for line in text.rstrip("\n").split("\n"))
    yield f"{due} of {len(recent)} users who relayed by POP-first recently would be sent a notice"


def _graduated_among(settings: Settings, users: tuple[str, ...]) -> frozenset[str]:
    """Those of ``users`` the graduates' file or Redis hash holds as graduated."""
    if settings.store.kind is StoreKind.REDIS:
        from popauth.store.redis import graduates_key_of

        key = graduates_key_of(settings.store.redis_key_prefix)
        return RedisGraduates(_redis_client(settings), key).graduated_among(users)
    return FileGraduates(settings.accounts.graduates_path).graduated_among(users)
