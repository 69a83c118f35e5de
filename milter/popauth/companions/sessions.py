"""``popauth sessions``: keep open IMAP/POP sessions relaying while they last.

A login whitelists its address for ``ttl`` seconds, but an IMAP client may
stay connected (IDLE) for hours without logging in again. This companion
runs on the Dovecot host. Every ``session_renew_interval`` seconds it lists
the live sessions with ``doveadm who -1`` and sends ``RENEW address user``
for each, pipelined over one connection, to the local ingest socket, which
renews them a batch at a time. The endpoint only
extends an entry that exists and belongs to that user, and refuses blocked
users, so a revoke or a block wins until the user's next real login; and
an address whose session ended simply expires ``ttl`` after its last
renewal.

It talks to the ingest socket like the login hook does, so it works with
either store: with Redis, the local popauth writes the renewal to the
shared whitelist that every MTA host reads.

A small loop beside Dovecot, and every step has a deadline. It logs as
``popauth serve`` does (:mod:`popauth.telemetry.logs`), in the same format.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from types import FrameType

import structlog

from popauth.basics.addresses import AddressError, parse_client_address
from popauth.basics.errors import UnavailableError
from popauth.basics.usernames import is_valid_user_name
from popauth.doors.ingest import wire
from popauth.doors.ingest.client import IngestClient, IngestUnreachable

# Column titles in ``doveadm -f tab who -1`` output (Dovecot 2.3 says
# "proto"; the field's name, and its title in later versions, is "service").
_SERVICE_COLUMNS = ("proto", "service")


class DoveadmError(UnavailableError, RuntimeError):
    """doveadm could not be run, failed, or printed something else than a listing."""


@dataclass(frozen=True, slots=True)
class Session:
    """One logged-in client as the renewal sees it: its address and user."""

    address: str
    user: str


@dataclass(slots=True)
class WhoListing:
    """The distinct (address, user) pairs of open sessions, and what was passed over."""

    sessions: list[Session] = field(default_factory=list)
    # Connections of other services (lmtp, submission, sieve...): not renewed.
    other_services: int = 0
    # Lines that could not be used: wrong field count, no or bad address, odd user.
    unusable: int = 0


def parse_doveadm_who(text: str, services: Collection[str]) -> WhoListing:
    """Parse ``doveadm -f tab who -1``: a header line, then one line per connection.

    Columns are found by their titles, so extra columns of other Dovecot
    versions do no harm. Connections of services not in ``services``, and
    lines without a usable address or user name, are counted and left out;
    a listing without the expected header raises :class:`DoveadmError`.
    """
    lines = [line.removesuffix("\r") for line in text.split("\n") if line.strip()]
    if not lines:
        raise DoveadmError("doveadm printed nothing, not even a header line")
    header = lines[0].split("\t")
    try:
        user_at = header.index("username")
        address_at = header.index("ip")
        service_at = next(header.index(name) for name in _SERVICE_COLUMNS if name in header)
    except (ValueError, StopIteration):
        raise DoveadmError(
            f"unexpected doveadm header {lines[0][:200]!r}: expected the tab-separated "
            "columns username, proto and ip of 'doveadm -f tab who -1'"
        ) from None
    listing = WhoListing()
    seen: set[Session] = set()
    for line in lines[1:]:
        fields = line.split("\t")
        if len(fields) != len(header):
            listing.unusable += 1
            continue
        if fields[service_at] not in services:
            listing.other_services += 1
            continue
        user = fields[user_at]
        try:
            address = str(parse_client_address(fields[address_at]))
        except AddressError:
            listing.unusable += 1  # e.g. no address: a connection over a UNIX socket
            continue
        if not is_valid_user_name(user):
            listing.unusable += 1
            continue
        session = Session(address, user)
        if session not in seen:
            seen.add(session)
            listing.sessions.append(session)
    return listing


def doveadm_command(doveadm: str, dovecot_config: str) -> list[str]:
    """The command that lists live sessions, one per connection, tab-separated."""
    config = ["-c", dovecot_config] if dovecot_config else []
    return [doveadm, *config, "-f", "tab", "who", "-1"]


def list_sessions(command: Sequence[str], services: Collection[str], timeout: float) -> WhoListing:
    """Run ``command`` (doveadm who) with a deadline and parse what it prints."""
    try:
        completed = subprocess.run(
            list(command),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise DoveadmError(f"{command[0]} did not finish within {timeout:g}s") from None
    except OSError as error:
        raise DoveadmError(f"cannot run {command[0]}: {error.strerror or error}") from None
    if completed.returncode != 0:
        detail = completed.stderr.decode("utf-8", "replace").strip()[-300:]
        raise DoveadmError(f"{command[0]} exited with status {completed.returncode}: {detail}")
    return parse_doveadm_who(completed.stdout.decode("utf-8", "replace"), services)


@dataclass(frozen=True, slots=True)
class RenewalCounts:
    """How the endpoint answered one batch of RENEW requests."""

    renewed: int = 0
    # No entry (expired, revoked, never granted) or another user's: left alone.
    not_found: int = 0
    blocked: int = 0
    # Any other ERR reply (forbidden, unavailable, ...), and the first of them.
    errors: int = 0
    first_error: str = ""


def renew_sessions(client: IngestClient, sessions: Sequence[Session]) -> RenewalCounts:
    """Send one RENEW per session over one connection; count the replies.

    They are pipelined, :data:`wire.RENEW_BATCH` at a time, so the endpoint
    renews each window in one step (with Redis, one script call).
    """
    if not sessions:
        return RenewalCounts()
    replies = client.request_many(
        [f"{wire.Verb.RENEW.value} {s.address} {s.user}" for s in sessions],
        window=wire.RENEW_BATCH,
    )
    renewed = not_found = blocked = errors = 0
    first_error = ""
    for reply in replies:
        status, code = wire.reply_status(reply)
        if status == wire.OK:
            renewed += 1
        elif status == wire.NOT_FOUND:
            not_found += 1
        elif code is wire.ErrorCode.BLOCKED:
            blocked += 1
        else:
            errors += 1
            first_error = first_error or reply
    return RenewalCounts(renewed, not_found, blocked, errors, first_error)


@dataclass(frozen=True, slots=True)
class RenewalPlan:
    """What ``popauth sessions`` does each cycle, from the settings."""

    ingest_socket: str
    command: tuple[str, ...]
    services: frozenset[str]
    interval: float


class SessionRenewer:
    """One cycle: list sessions, renew them; each cycle ends within the interval."""

    def __init__(self, plan: RenewalPlan, log: structlog.typing.FilteringBoundLogger) -> None:
        self._plan = plan
        self._log = log

    def cycle(self) -> bool:
        """Run one renewal cycle; False if it failed (logged)."""
        plan = self._plan
        started = time.monotonic()
        budget = plan.interval
        try:
            listing = list_sessions(plan.command, plan.services, budget)
        except DoveadmError as problem:
            self._log.error("sessions_unlisted", error=str(problem))
            return False
        listed = time.monotonic()
        remaining = max(0.1, budget - (listed - started))
        try:
            counts = renew_sessions(IngestClient(plan.ingest_socket, remaining), listing.sessions)
        except IngestUnreachable as problem:
            self._log.error(
                "sessions_not_renewed",
                sessions=len(listing.sessions),
                error=str(problem),
            )
            return False
        done = time.monotonic()
        level = self._log.error if counts.errors else self._log.info
        level(
            "sessions_renewed",
            sessions=len(listing.sessions),
            renewed=counts.renewed,
            not_found=counts.not_found,
            blocked=counts.blocked,
            errors=counts.errors,
            first_error=counts.first_error or None,
            other_services=listing.other_services,
            unusable_lines=listing.unusable,
            list_seconds=round(listed - started, 3),
            renew_seconds=round(done - listed, 3),
        )
        return counts.errors == 0

    def run(self, stop: threading.Event, on_ready: Callable[[], None] | None = None) -> None:
        """Cycle every interval until ``stop`` is set (SIGTERM, SIGINT).

        ``on_ready`` runs once the first cycle is done (systemd's READY=1):
        the settings were usable and the renewer is cycling.
        """
        plan = self._plan
        self._log.info(
            "sessions_started",
            interval=plan.interval,
            command=" ".join(plan.command),
            services=sorted(plan.services),
            ingest_socket=plan.ingest_socket,
        )
        due = time.monotonic()
        while not stop.is_set():
            self.cycle()
            if on_ready is not None:
                on_ready()
                on_ready = None
            due += plan.interval
            # A late cycle starts the next one at once, never a burst of them.
            due = max(due, time.monotonic())
            stop.wait(due - time.monotonic())
        self._log.info("sessions_stopped")


def run_until_signalled(
    renewer: SessionRenewer, on_ready: Callable[[], None] | None = None
) -> None:
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, request_stop)
    renewer.run(stop, on_ready)
