"""The notice worker: the gate hands it users, a thread of its own mails them.

:meth:`NoticeWorker.offer` is all the relay gate calls, once per message
relayed by POP-first: a dictionary look-up and, at most once per user and
interval, a ``put_nowait`` on a bounded queue. When the queue is full the
user is dropped (counted, and logged once until the queue takes users
again): the next message of that user offers again. The thread claims the
user's record in the ledger, submits the notice through sendmail under a
timeout and paces itself (``pop_first_notices_per_minute``); a failed
submission gives the claim back and is retried later, each time after
twice the wait before (from ``pop_first_notice_retry``, at most a day).
Neither a slow sendmail nor a ledger that does not answer ever holds up a
message or a login.
"""

from __future__ import annotations

import heapq
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from popauth.basics.clock import Clock
from popauth.basics.escaping import escape_text
from popauth.basics.usernames import user_key
from popauth.notices.ledger import LedgerUnavailable, NoticeHistory, NoticeLedger, Sent
from popauth.notices.mail import NoticeMail, SubmissionFailed, notice_address, notice_values
from popauth.notices.schedule import NoticeSchedule
from popauth.telemetry.metrics import Metrics

LONGEST_RETRY = 86_400.0
# How long the thread waits for the queue before it looks at its retries.
_IDLE_WAIT = 0.5
# How long stop() waits for the thread (a submission is killed first).
_STOP_GRACE = 5.0


@dataclass(frozen=True, slots=True)
class NoticeOptions:
    """How the worker runs: from the settings, apart from what a notice says."""

    instructions: str
    # The first local domain: a login without "@" gets its notice there.
    domain: str | None
    queue_size: int = 1000
    per_minute: float = 30.0
    retry: float = 300.0


class NoticeWorker:
    def __init__(
        self,
        *,
        schedule: NoticeSchedule,
        ledger: NoticeLedger,
        mail: NoticeMail,
        submit: Callable[[str, str, bytes], None],
        options: NoticeOptions,
        clock: Clock,
        metrics: Metrics,
        log: structlog.typing.FilteringBoundLogger,
        cancel: Callable[[], None] = lambda: None,
        sent: Callable[[str], None] = lambda user: None,
    ) -> None:
        """``sent``: told the user of each notice sent (the usage ledger's weekly trend)."""
        self._sent = sent
        self._schedule = schedule
        self._ledger = ledger
        self._mail = mail
        self._submit = submit
        self._cancel = cancel
        self._options = options
        self._clock = clock
        self._metrics = metrics
        self._log = log.bind(component="notices")
        self._queue: queue.Queue[str] = queue.Queue(maxsize=options.queue_size)
        # Caseless user -> time before which an offer is not worth queueing
        # (already queued, retrying, or told until then).
        self._quiet_until: dict[str, float] = {}
        # Past this many, the ended spells are dropped; then twice as many as
        # are left, so that the pass (under the lock offer() takes) stays rare
        # however many users are told within an interval.
        self._forget_past = self._least_forget_past = 4 * options.queue_size
        self._lock = threading.Lock()
        self._dropping = False
        # (when, user, attempt) of failed submissions.
        self._retries: list[tuple[float, str, int]] = []
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the gate's side: never blocks ---------------------------------------

    def offer(self, user: str) -> None:
        """``user`` relayed a message by POP-first."""
        if not user:
            return
        now = self._clock.time()
        key = user_key(user)
        with self._lock:
            if self._quiet_until.get(key, 0.0) > now:
                return
            try:
                self._queue.put_nowait(user)
            except queue.Full:
                first_drop, self._dropping = not self._dropping, True
            else:
                self._dropping = first_drop = False
                # Until the thread has handled it; it sets the real time then.
                self._quiet_until[key] = float("inf")
                return
        # Dropped: counted, and logged outside the lock once per full spell.
        self._metrics.notices.labels("dropped").inc()
        if first_drop:
            self._log.warning(
                "notice_queue_full", size=self._options.queue_size, user=escape_text(user)
            )

    # -- the thread ------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="popauth-notices", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._cancel()
        if self._thread is not None:
            self._thread.join(_STOP_GRACE)
            if self._thread.is_alive():
                self._log.error("notices_stop_timeout", seconds=_STOP_GRACE)
            self._thread = None

    def _run(self) -> None:
        pause = 60.0 / self._options.per_minute
        while not self._stopping.is_set():
            if self.work_once(_IDLE_WAIT):
                self._stopping.wait(pause)

    def work_once(self, wait: float = 0.0) -> bool:
        """Handle one retry that is due, or one queued user (waiting up to ``wait``).

        False: there was nothing to do.
        """
        now = self._clock.time()
        with self._lock:
            retry = self._retries[0] if self._retries and self._retries[0][0] <= now else None
            if retry is not None:
                heapq.heappop(self._retries)
        if retry is not None:
            user, attempt = retry[1], retry[2]
        else:
            try:
                user = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                return False
            attempt = 0
        try:
            self._handle(user, attempt)
        except Exception:
            # A bug must not end the notices for good, nor reach the milter;
            # the user is offered again after the usual wait.
            self._log.exception("notice_worker_failed", user=escape_text(user))
            self._quiet(user, now + self._options.retry)
        return True

    def _handle(self, user: str, attempt: int) -> None:
        now = self._clock.time()
        if not self._schedule.active(now):
            self._quiet(user, now + self._schedule.interval)
            return
        address = notice_address(user, self._options.domain)
        if address is None:
            self._log.warning("notice_no_address", user=escape_text(user))
            self._quiet(user, now + self._schedule.interval)
            return
        record = Sent(now, self._schedule.next_due(now))
        try:
            claimed = self._ledger.claim(user, record, now)
        except LedgerUnavailable as failure:
            self._failed(user, attempt, address, str(failure))
            return
        if not claimed:
            self._log.info("notice_not_due", user=escape_text(user))
            self._quiet(user, now + min(self._schedule.interval, self._options.retry))
            return
        values = notice_values(user, self._schedule, self._options.instructions, now)
        try:
            self._submit(self._mail.sender, address, self._mail.compose(address, values, now))
        except SubmissionFailed as failure:
            if self._gave_back(user, record):
                self._failed(user, attempt, address, str(failure))
            return
        self._metrics.notices.labels("sent").inc()
        try:
            self._ledger.note_sent(user, now)
        except LedgerUnavailable as failure:
            # Sent and claimed: only popauth report --campaign counts one fewer.
            self._log.error("notice_history_not_saved", user=escape_text(user), error=str(failure))
        self._sent(user)
        self._log.info(
            "notice_sent",
            user=escape_text(user),
            recipient=escape_text(address),
            next_due=round(record.due_at),
        )
        self._quiet(user, record.due_at)

    def _gave_back(self, user: str, record: Sent) -> bool:
        """Release the claim of a notice not sent; False (logged, counted) if it stands."""
        try:
            self._ledger.release(user, record)
        except LedgerUnavailable as failure:
            # The claim stands: this user is told again only when it expires.
            self._log.error("notice_release_failed", user=escape_text(user), error=str(failure))
            self._metrics.notices.labels("failed").inc()
            self._quiet(user, record.due_at)
            return False
        return True

    def _failed(self, user: str, attempt: int, address: str, error: str) -> None:
        wait = min(self._options.retry * 2**attempt, LONGEST_RETRY)
        self._metrics.notices.labels("failed").inc()
        self._log.error(
            "notice_failed",
            user=escape_text(user),
            recipient=escape_text(address),
            error=escape_text(error),
            attempt=attempt + 1,
            retry_in=round(wait),
        )
        when = self._clock.time() + wait
        with self._lock:
            heapq.heappush(self._retries, (when, user, attempt + 1))

    def _quiet(self, user: str, until: float) -> None:
        with self._lock:
            self._quiet_until[user_key(user)] = until
            if len(self._quiet_until) > self._forget_past:
                now = self._clock.time()
                self._quiet_until = {k: t for k, t in self._quiet_until.items() if t > now}
                self._forget_past = max(self._least_forget_past, 2 * len(self._quiet_until))

    def history(self) -> dict[str, NoticeHistory]:
        """Who was sent how many notices, last when (``popauth report --campaign``)."""
        return self._ledger.history()

    def pending_retries(self) -> list[tuple[float, str, int]]:
        """The failed submissions waiting, soonest first: (when, user, attempt)."""
        with self._lock:
            return sorted(self._retries)
