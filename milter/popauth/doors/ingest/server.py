"""The ingest endpoint: a UNIX stream socket served by asyncio in its own thread.

It runs beside libmilter, which owns the main thread and the signals, so it
has its own event loop (``popauth.doors.unixserver``) and is stopped explicitly
after the milter returns.
Each client gets a bounded line length, an idle timeout per request, and a
cap on concurrent clients; bad input gets an ``ERR`` reply and changes
nothing, and no client can stop the endpoint from serving the others.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import structlog

from popauth.basics.addresses import IPAddress, WhitelistKeying
from popauth.basics.clock import Clock, SystemClock
from popauth.basics.escaping import escape_user_name
from popauth.basics.posixids import SystemGroup
from popauth.basics.usernames import user_key
from popauth.doors.ingest import protocol, wire
from popauth.doors.ingest.protocol import ErrorCode, ProtocolError, Request, Verb
from popauth.doors.ingest.roles import PeerPolicy, RoleOptions
from popauth.doors.unixserver import (
    FramingError,
    Peer,
    Refusals,
    SocketOptions,
    UnixStreamServer,
)
from popauth.notices.ledger import NoticeHistory
from popauth.relay.decision import Campaign, RelayBudget
from popauth.relay.explain import Explainer, Question, explanation_lines
from popauth.store import (
    BudgetUse,
    NotConfirmed,
    Renewal,
    StoreUnavailable,
    UserBlocked,
    WhitelistStore,
)
from popauth.store.accounts import (
    BlockList,
    BlockListUnwritable,
    FileGraduates,
    Graduates,
    Usage,
    UsageLedger,
)
from popauth.telemetry.metrics import Metrics

# A whitelist key's relay budget and its use now, counting nothing; None:
# no budget is configured. Raises StoreUnavailable.
BudgetReader = Callable[[IPAddress], tuple[RelayBudget, BudgetUse] | None]

# PeerPolicy is part of what building an IngestServer takes.
__all__ = ["IngestOptions", "IngestServer", "PeerPolicy"]


class IngestOptions(RoleOptions, SocketOptions, Protocol):
    """What the ingest door reads from its settings group (``settings.ingest``).

    ``timeout`` is for every request line, the first included;
    ``clients_per_uid`` binds the uids without a role (peers with a role:
    no quota).
    """

    @property
    def socket(self) -> Path: ...
    @property
    def socket_acl_groups(self) -> tuple[SystemGroup, ...]: ...
    # Seconds a new connection may stay silent: the hook writes at once.
    @property
    def first_byte_timeout(self) -> float: ...


class IngestServer(UnixStreamServer):
    def __init__(
        self,
        *,
        settings: IngestOptions,
        store: WhitelistStore,
        keying: WhitelistKeying,
        blocklist: BlockList,
        ledger: UsageLedger,
        metrics: Metrics,
        log: structlog.typing.FilteringBoundLogger,
        explainer: Explainer | None = None,
        peers: PeerPolicy | None = None,
        graduates: Graduates | None = None,
        campaign: Callable[[], Campaign] = Campaign,
        clock: Clock | None = None,
        notice_history: Callable[[], dict[str, NoticeHistory]] | None = None,
        budgets: BudgetReader | None = None,
    ) -> None:
        """``peers``: who holds which role; by default the settings' roles.
        ``graduates`` and ``campaign`` (the live policy's, read per request):
        what REPORT and REINSTATE see of the phase-out of POP-first;
        ``notice_history``: the notice ledger's, for ``REPORT view=campaign``;
        ``budgets``: the relay budget of an address, for QUERY (the gate's)."""
        super().__init__(
            path=settings.socket,
            settings=settings,
            acl_groups=settings.socket_acl_groups,
            # Each complete line restarts the clock: a client has ``timeout``
            # seconds for every request, the first included.
            idle_timeout=settings.timeout,
            refusals=Refusals(
                timeout=_TIMEOUT,
                idle=_TIMEOUT,
                busy=_BUSY,
                busy_answers_a_request=False,
                internal=_INTERNAL,
            ),
            blocking_calls=store.may_block,
            thread_name="popauth-ingest",
            log=log.bind(door="ingest"),
            first_byte_timeout=min(settings.first_byte_timeout, settings.timeout),
        )
        self._store = store
        self._keying = keying
        self._peers = peers if peers is not None else PeerPolicy.of_roles(settings)
        self._blocklist = blocklist
        self._ledger = ledger
        self._metrics = metrics
        self._explainer = explainer
        self._graduates = graduates if graduates is not None else FileGraduates(None)
        self._campaign = campaign
        self._clock = clock or SystemClock()
        self._notice_history = notice_history
        self._budgets = budgets

    # --- framing -----------------------------------------------------------

    def split_request(self, buffer: bytearray) -> tuple[bytes, int] | None:
        end = buffer.find(b"\n")
        if end < 0 and len(buffer) <= protocol.MAX_LINE:
            return None
        if end < 0 or end >= protocol.MAX_LINE:
            # A line that long cannot be resynchronised safely: end it.
            raise FramingError(_TOO_LONG, "too-long")
        return bytes(buffer[: end + 1]), end + 1

    def privileged(self, peer: Peer) -> bool:
        return self._peers.holds_a_role(peer)

    def answers_off_loop(self, request: bytes) -> bool:
        # A listing or revocation walks the whole whitelist: the logins of
        # other connections go on meanwhile (the store lets them in).
        verb = request.split(None, 1)[:1]
        return self.blocking_calls or (bool(verb) and verb[0].upper() in _WHOLE_WHITELIST)

    def note(self, event: str, peer: Peer) -> None:
        if event == "evicted":
            # Under a flood of silent clients this happens constantly.
            self._log.debug("ingest_idle_client_closed", peer_uid=peer.uid)
        elif event in ("timeout", "idle_timeout"):
            self._log.info("ingest_timeout", peer_uid=peer.uid)
        elif event == "busy":
            self._log.warning("ingest_busy", peer_uid=peer.uid, clients=self.clients)
        elif event == "framing_error":
            self._log.warning("ingest_rejected", peer_uid=peer.uid, error="too-long")
        elif event == "partial_request":
            self._log.warning("ingest_partial_request", peer_uid=peer.uid)
        else:
            super().note(event, peer)

    def answer_request(self, line: bytes, peer: Peer) -> tuple[bytes, bool]:
        """The reply to one request line, and whether to keep the connection."""
        try:
            request = protocol.parse_request(line)
        except ProtocolError as problem:
            return self._rejected(problem, peer), True
        verb = request.verb.value
        refusal = self._refusal(request, peer)
        if refusal is not None:
            return self._forbidden(verb, refusal, peer), True
        try:
            reply = self._execute(request, peer)
        except BlockListUnwritable as failure:
            # Nothing changed, in memory or on disk: say so, loudly.
            self._metrics.ingest_request(verb, "unavailable")
            self._metrics.errors.labels("blocklist_unwritable").inc()
            self._log.error(
                "blocklist_write_failed",
                verb=verb,
                user=request.user,
                error=str(failure),
                peer_uid=peer.uid,
            )
            return protocol.error(
                ErrorCode.UNAVAILABLE, "block list cannot be saved, nothing changed"
            ), True
        except _Incomplete as partly:
            self._metrics.ingest_request(verb, "incomplete")
            return protocol.error(ErrorCode.INCOMPLETE, str(partly)), True
        except NotConfirmed as failure:
            return self._not_confirmed(request, failure, peer), True
        except StoreUnavailable as failure:
            self._metrics.ingest_request(verb, "unavailable")
            self._metrics.errors.labels("store_unavailable").inc()
            self._log.error("ingest_store_unavailable", verb=verb, error=str(failure))
            return _UNAVAILABLE, True
        except Exception:
            self._metrics.ingest_request(verb, "internal")
            self._metrics.errors.labels("internal").inc()
            self._log.exception("ingest_internal_error", verb=verb, peer_uid=peer.uid)
            return _INTERNAL, True
        self._metrics.ingest_request(verb, _result(reply))
        return reply, request.verb is not Verb.QUIT

    def _rejected(self, problem: ProtocolError, peer: Peer) -> bytes:
        self._metrics.ingest_request("invalid", problem.code.value)
        self._log.warning("ingest_rejected", peer_uid=peer.uid, error=problem.code.value)
        return protocol.error(problem.code, problem.reason)

    def _forbidden(self, verb: str, refusal: str, peer: Peer) -> bytes:
        self._metrics.ingest_request(verb, "forbidden")
        self._log.warning("ingest_forbidden", verb=verb, peer_uid=peer.uid, peer_gid=peer.gid)
        return protocol.error(ErrorCode.FORBIDDEN, refusal)

    # --- pipelined renewals, one store call for many -------------------------

    def joins_batch(self, request: bytes) -> bool:
        # A hint only: every line of a batch is parsed and checked on its own.
        return request[:6].upper() == _RENEW_PREFIX

    @property
    def max_batch(self) -> int:
        return wire.RENEW_BATCH

    def answer_batch(self, requests: list[bytes], peer: Peer) -> list[tuple[bytes, bool]]:
        """The replies to consecutive RENEW requests: each parsed and checked
        on its own, the valid ones renewed in one store call, in order."""
        replies: list[tuple[bytes, bool] | None] = [None] * len(requests)
        renewals: list[tuple[int, IPAddress, str]] = []
        for index, line in enumerate(requests):
            try:
                request = protocol.parse_request(line)
            except ProtocolError as problem:
                replies[index] = self._rejected(problem, peer), True
                continue
            if request.verb is not Verb.RENEW or request.address is None:
                replies[index] = self.answer_request(line, peer)
                continue
            refusal = self._refusal(request, peer)
            if refusal is not None:
                replies[index] = self._forbidden(request.verb.value, refusal, peer), True
                continue
            renewals.append((index, self._keying.key_address(request.address), request.user))
        if renewals:
            renewed = self._renew_many(renewals)
            for (index, _, _), reply in zip(renewals, renewed, strict=True):
                replies[index] = reply, True
        answered = [reply for reply in replies if reply is not None]
        if len(answered) != len(requests):
            raise RuntimeError("a request of the batch was left unanswered")
        return answered

    def _renew_many(self, renewals: list[tuple[int, IPAddress, str]]) -> list[bytes]:
        verb = Verb.RENEW.value
        try:
            outcomes = self._store.renew_many([(key, user) for _, key, user in renewals])
        except StoreUnavailable as failure:
            self._metrics.ingest_request(verb, "unavailable", len(renewals))
            self._metrics.errors.labels("store_unavailable").inc(len(renewals))
            self._log.error(
                "ingest_store_unavailable", verb=verb, error=str(failure), requests=len(renewals)
            )
            return [_UNAVAILABLE] * len(renewals)
        except Exception:
            self._metrics.ingest_request(verb, "internal", len(renewals))
            self._metrics.errors.labels("internal").inc(len(renewals))
            self._log.exception("ingest_internal_error", verb=verb, requests=len(renewals))
            return [_INTERNAL] * len(renewals)
        replies = [
            self._renewal_reply(outcome, self._keying.describe(key), user)
            for (_, key, user), outcome in zip(renewals, outcomes, strict=True)
        ]
        for result, count in Counter(_result(reply) for reply in replies).items():
            self._metrics.ingest_request(verb, result, count)
        return replies

    def _not_confirmed(self, request: Request, failure: NotConfirmed, peer: Peer) -> bytes:
        """The reply when the replicas did not confirm a change: say what state it left."""
        verb = request.verb.value
        confirmed = f"{failure.acknowledged} of {failure.wanted} replicas confirmed it"
        if failure.undone:
            code, state, reason = (
                ErrorCode.UNAVAILABLE,
                "undone",
                f"{confirmed}; undone, nothing changed",
            )
        else:
            code, state = ErrorCode.INCOMPLETE, "in force on the master only"
            reason = (
                f"{verb} is in force on the Redis master, but only {confirmed}: "
                "a failover may undo it; repeat it when the replicas are back"
            )
        target = {"user": request.user}
        if request.address is not None:
            target = {"client_ip": self._keying.describe(self._keying.key_address(request.address))}
        self._metrics.ingest_request(verb, code.value)
        self._metrics.errors.labels("not_confirmed").inc()
        self._log.error(
            "change_not_confirmed",
            verb=verb,
            acknowledged=failure.acknowledged,
            wanted=failure.wanted,
            state=state,
            peer_uid=peer.uid,
            **target,
        )
        return protocol.error(code, reason)

    def _refusal(self, request: Request, peer: Peer) -> str | None:
        return self._peers.refusal(request.verb, peer)

    def _execute(self, request: Request, peer: Peer) -> bytes:
        verb = request.verb
        if verb is Verb.PING:
            return protocol.ok("pong")
        if verb is Verb.QUIT:
            return protocol.ok("bye")
        if verb is Verb.STATS:
            return protocol.ok(protocol.stats_fields(self._store.stats()))
        if verb is Verb.LIST:
            return protocol.multi_line(
                protocol.format_grant(grant, self._keying.describe(grant.address))
                for chunk in self._store.entry_chunks()
                for grant in chunk
            )
        if verb is Verb.BLOCKED:
            return protocol.multi_line(
                f"user={escape_user_name(user)}" for user in self._blocklist.users()
            )
        if verb is Verb.REPORT and request.option("view") == protocol.CAMPAIGN_VIEW:
            return protocol.multi_line(self._campaign_lines())
        if verb is Verb.REPORT:
            return protocol.multi_line(self._report_lines())
        if verb is Verb.EXPLAIN:
            return self._explain(request, peer)
        if request.address is None:
            return self._execute_for_user(verb, request.user, peer)
        key = self._keying.key_address(request.address)
        described = self._keying.describe(key)
        if verb is Verb.LOGIN:
            return self._login(key, described, request.user, peer)
        if verb is Verb.RENEW:
            return self._renew(key, described, request.user)
        if verb is Verb.REVOKE:
            removed = self._store.revoke(key)
            self._log.info(
                "revoke", client_ip=described, found=removed is not None, peer_uid=peer.uid
            )
            self._store.confirm_changes()
            if removed is None:
                return protocol.not_found(described)
            return protocol.ok(protocol.format_entry(removed, described))
        entry = self._store.lookup(key)
        if entry is None:
            return protocol.not_found(described)
        found = None if self._budgets is None else self._budgets(key)
        if found is None:
            return protocol.ok(protocol.format_entry(entry, described))
        budget, use = found
        return protocol.ok(
            f"{protocol.format_entry(entry, described)} {protocol.format_budget(budget, use)}"
        )

    def _login(self, key: IPAddress, described: str, user: str, peer: Peer) -> bytes:
        try:
            # The store checks the block list in the same step as the write.
            outcome = self._store.grant(key, user)
        except UserBlocked:
            self._log.warning("login_refused_blocked", client_ip=described, user=user)
            return protocol.error(ErrorCode.BLOCKED, f"user {user} is blocked")
        if outcome.evicted is not None:
            self._log.warning(
                "whitelist_full_evicted",
                evicted=self._keying.describe(outcome.evicted.address),
                evicted_user=outcome.evicted.user,
                evicted_users=list(outcome.evicted.users),
            )
        if outcome.displaced is not None:
            # The address held max_users_per_address users: the one expiring
            # soonest made room, and may relay from there no longer.
            self._log.warning(
                "address_full_user_displaced",
                client_ip=described,
                user=user or None,
                displaced_user=outcome.displaced.user or None,
            )
        self._log.info(
            "login",
            client_ip=described,
            user=user or None,
            renewed=outcome.renewed,
            peer_uid=peer.uid,
        )
        renewed = "yes" if outcome.renewed else "no"
        return protocol.ok(f"{protocol.format_grant(outcome.grant, described)} renewed={renewed}")

    def _renew(self, key: IPAddress, described: str, user: str) -> bytes:
        """Extend a live session's entry; never create one (see store.renew)."""
        (outcome,) = self._store.renew_many([(key, user)])
        return self._renewal_reply(outcome, described, user)

    def _renewal_reply(self, outcome: Renewal, described: str, user: str) -> bytes:
        if outcome.blocked:
            self._log.warning("renew_refused_blocked", client_ip=described, user=user)
            return protocol.error(ErrorCode.BLOCKED, f"user {user} is blocked")
        # One line per open session per cycle: debug only; the renewing side
        # logs a summary of each cycle.
        self._log.debug("renew", client_ip=described, user=user, found=outcome.grant is not None)
        if outcome.grant is None:
            return protocol.not_found(described)
        return protocol.ok(protocol.format_grant(outcome.grant, described))

    def _explain(self, request: Request, peer: Peer) -> bytes:
        """The milter's verdict for a client and recipient, and why, in plain lines."""
        if self._explainer is None or request.address is None:
            return protocol.error(ErrorCode.UNAVAILABLE, "this endpoint cannot explain")
        question = Question(
            address=request.address,
            recipient=request.recipient,
            user=request.option("user"),
            auth_user=request.option("auth"),
            sender=request.option("sender"),
            mailer=request.option("mailer"),
        )
        facts = self._explainer.facts(question)
        decision = facts.assessment.decision
        self._log.info(
            "explain",
            client_ip=str(request.address),
            recipient=request.recipient,
            verdict=decision.verdict.value,
            reason=decision.reason.value,
            peer_uid=peer.uid,
        )
        return protocol.multi_line(explanation_lines(facts))

    def _report_lines(self) -> list[str]:
        """Users who relayed by POP first, most recent first, then graduates who never did."""
        campaign = self._campaign()
        graduations = self._graduates.records()
        lines = []
        reported = set()
        for user, usage in self._ledger.pop_first_users():
            key = user_key(user)
            reported.add(key)
            exempt = campaign.exempts(user)
            lines.append(protocol.format_usage(user, usage, graduations.get(key), exempt))
        for key, graduation in sorted(graduations.items()):
            if key not in reported:
                usage = self._ledger.get(key) or Usage()
                exempt = campaign.exempts(key)
                lines.append(protocol.format_usage(key, usage, graduation, exempt))
        return lines

    def _campaign_lines(self) -> list[str]:
        """``REPORT view=campaign``: the retirement date, then one line per user
        of the campaign (who relayed by POP first, graduated, is exempt or was
        sent a notice), most recently active first, then the weekly trend."""
        campaign = self._campaign()
        graduations = self._graduates.records()
        history = self._notice_history() if self._notice_history is not None else {}
        rows: dict[str, tuple[str, Usage]] = {}
        for user, usage in self._ledger.users():
            if usage.pop_messages or usage.retired_refusals:
                rows.setdefault(user_key(user), (user, usage))
        for user in [*graduations, *sorted(campaign.exempt_users), *history]:
            key = user_key(user)
            if key not in rows:
                rows[key] = (user, self._ledger.get(user) or self._ledger.get(key) or Usage())
        lines = [f"retire_at={int(campaign.retire_at or 0)} now={int(self._clock.time())}"]
        for key, (user, usage) in rows.items():
            lines.append(
                protocol.format_campaign_user(
                    user,
                    usage,
                    graduations.get(key),
                    history.get(key),
                    campaign.exempts(user),
                )
            )
        lines.extend(protocol.format_week(week) for week in self._ledger.weeks())
        return lines

    def _reinstate(self, user: str, peer: Peer) -> bytes:
        """Undo a graduation; written (and confirmed by the replicas) before OK."""
        try:
            graduation = self._graduates.reinstate(user, self._clock.time())
        except StoreUnavailable as failure:
            self._log.error("reinstate_failed", user=user, error=str(failure), peer_uid=peer.uid)
            return protocol.error(ErrorCode.UNAVAILABLE, f"not reinstated: {failure}")
        self._log.info(
            "pop_first_reinstated", user=user, found=graduation is not None, peer_uid=peer.uid
        )
        if graduation is None:
            return protocol.not_found_user(user)
        self._store.confirm_changes()
        return protocol.ok(f"user={user} graduated={int(graduation.graduated_at)}")

    def _execute_for_user(self, verb: Verb, user: str, peer: Peer) -> bytes:
        if verb is Verb.REINSTATE:
            return self._reinstate(user, peer)
        if verb is Verb.UNBLOCK:
            unblocked = self._blocklist.remove(user)
            self._log.info("unblock", user=user, found=unblocked, peer_uid=peer.uid)
            self._store.confirm_changes()
            return protocol.ok(f"user={user}") if unblocked else protocol.not_found_user(user)
        newly_blocked = None
        if verb is Verb.BLOCK:
            # Block first: a login that has not yet written its entry is then
            # refused, and one that has is revoked below (see WhitelistStore).
            newly_blocked = self._blocklist.add(user)
        try:
            revoked = self._store.revoke_user(user)
        except StoreUnavailable as failure:
            if verb is not Verb.BLOCK:
                raise
            self._log.error("block_not_revoked", user=user, error=str(failure), peer_uid=peer.uid)
            raise _Incomplete(
                f"user {user} is blocked, but their entries could not be revoked: repeat BLOCK"
            ) from failure
        addresses = [self._keying.describe(grant.address) for grant in revoked]
        self._log.info(
            verb.value.lower(),
            user=user,
            revoked=addresses,
            blocked=newly_blocked,
            peer_uid=peer.uid,
        )
        self._store.confirm_changes()
        fields = f"user={user} revoked={len(revoked)}"
        if newly_blocked is not None:
            fields += " blocked=" + ("new" if newly_blocked else "already")
        return protocol.ok(fields)


class _Incomplete(Exception):
    """A change is in force, but not all of it: the reason says what holds."""


def _result(reply: bytes) -> str:
    """A reply's first word, as the metrics count it: ok, notfound, err."""
    if reply.startswith(b"OK ") or reply == b"OK\n":
        return "ok"  # nearly every reply: no splitting and decoding
    return reply.split(b" ", 1)[0].rstrip(b"\n").decode().lower()


_RENEW_PREFIX = f"{Verb.RENEW.value} ".encode()
_UNAVAILABLE = protocol.error(ErrorCode.UNAVAILABLE, "whitelist store unavailable")
# Verbs whose answer walks the whole whitelist.
_WHOLE_WHITELIST = frozenset({b"LIST", b"REVOKEUSER", b"BLOCK"})
_TOO_LONG = protocol.error(ErrorCode.TOO_LONG, f"request longer than {protocol.MAX_LINE} bytes")
_TIMEOUT = protocol.error(ErrorCode.TIMEOUT, "no complete request in time")
_BUSY = protocol.error(ErrorCode.BUSY, "too many clients, try again")
_INTERNAL = protocol.error(ErrorCode.INTERNAL, "unexpected error, logged by popauth")
