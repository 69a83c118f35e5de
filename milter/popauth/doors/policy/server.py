"""The policy door: Postfix's ``check_policy_service`` asks popauth to judge a recipient.

A third door to the same decision as the milter. Postfix sends one
request per RCPT TO, with the client address, the SMTP AUTH user
(``sasl_username``), the envelope sender and the recipient; the door asks
:class:`popauth.relay.gate.RelayGate` exactly as the milter adapter does
(the sender once per message, then each recipient), so the verdicts, the
``pop_first_sender`` checks and the refusal texts are the milter's.

The replies, for ``smtpd_relay_restrictions`` placed after
``permit_auth_destination`` and before ``reject_unauth_destination``:

- a client popauth lets relay (SMTP AUTH, trusted network, POP/IMAP
  login: every accept but a local recipient's) gets ``OK``, a relay
  permission as ``permit_sasl_authenticated`` is. ``DUNNO`` would hand the
  recipient on to ``reject_unauth_destination``, which refuses every
  relayed one, and Postfix refuses relay restrictions that could end in a
  permit;
- an accepted local recipient gets ``DUNNO`` (Postfix's own checks judge it);
- a refusal gets the milter's reply (``550 5.7.1 Relaying denied. ...``);
  a whitelist that cannot be read, ``451 4.3.0``.

Fail closed: a request that cannot be judged (malformed, too long, an
attribute Postfix does not send, no client address or recipient) and any
unexpected failure get ``451 4.3.0 Relay check failed``, never a permit. So
does a request for a protocol state other than RCPT: relaying is decided
per recipient, and a door hooked anywhere else (smtpd_end_of_data_restrictions,
say) would otherwise seem to guard what it does not.

The door never sees the end of the data, so relayed recipients are counted
in the usage ledger when they are accepted (a message with its first
relayed recipient), including those of a transaction the client abandons.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog

from popauth.basics.addresses import AddressError, IPAddress, parse_client_address
from popauth.doors.policy import codec
from popauth.doors.policy.codec import RequestError, RequestTooLong
from popauth.doors.unixserver import FramingError, MtaDoor, MtaSocketOptions, Peer
from popauth.relay.decision import Decision, Reason, Verdict
from popauth.relay.gate import Message, RelayGate
from popauth.relay.recipients import Recipient
from popauth.relay.replies import CHECK_FAILED, Replies, SmtpReply
from popauth.telemetry.metrics import Metrics

RCPT_STATE = "RCPT"
_PERMIT = codec.reply("OK")
_DUNNO = codec.reply("DUNNO")
_FAILED = codec.reply(str(CHECK_FAILED))


class PolicyOptions(MtaSocketOptions, Protocol):
    """What the policy door reads from its settings group (``settings.policy``)."""


@dataclass(slots=True)
class Transaction:
    """One message's state between its RCPT requests (the gate's Message)."""

    message: Message
    # The gate's verdict for every recipient (decided with the sender), or None.
    settled: Decision | None
    # Relayed recipients already in the usage ledger.
    counted: int = 0


# (instance, client address, SASL user, sender): a new value of any is a new
# message; the last three are in it so that a request can never be judged by
# another client's verdict.
TransactionKey = tuple[str, str, str, str | None]


class PolicyServer(MtaDoor):
    def __init__(
        self,
        *,
        path: Path,
        settings: PolicyOptions,
        gate: RelayGate,
        replies: Replies,
        metrics: Metrics,
        log: structlog.typing.FilteringBoundLogger,
        blocking_calls: bool,
    ) -> None:
        super().__init__(
            path=path,
            settings=settings,
            timeout_reply=_FAILED,
            busy_reply=_FAILED,
            internal_reply=_FAILED,
            blocking_calls=blocking_calls,
            thread_name="popauth-policy",
            log=log.bind(door="policy"),
        )
        self._gate = gate
        self._replies = replies
        self._bad_requests = metrics.errors.labels("policy_bad_request")
        # The action line of each refusal the gate gives (a handful of
        # replies, fixed by the settings): formatted at its first use only.
        self._refusal_lines: dict[SmtpReply, bytes] = {}
        # Every smtpd process asks about one message at a time: its latest,
        # by peer pid, for as many processes as may be connected (and some).
        self._transactions: dict[int, tuple[TransactionKey, Transaction]] = {}
        self._max_transactions = 2 * settings.max_clients
        self._lock = threading.Lock()

    # --- framing -----------------------------------------------------------

    def split_request(self, buffer: bytearray) -> tuple[bytes, int] | None:
        try:
            return codec.split_first(buffer)
        except RequestTooLong as problem:
            # No end of request in sight: one refusal, then close.
            raise FramingError(_FAILED, str(problem)) from None

    def answer_request(self, request: bytes, peer: Peer) -> tuple[bytes, bool]:
        return self.answer(request, peer), True

    def note(self, event: str, peer: Peer) -> None:
        if event == "evicted":
            self._log.debug("policy_idle_client_closed", peer_uid=peer.uid)
        elif event == "framing_error":
            self._rejected("request too long", peer_uid=peer.uid)
        elif event == "busy":
            self._log.warning("policy_busy", clients=self.clients)
        elif event == "timeout":
            self._log.warning("policy_timeout", peer_uid=peer.uid)
        elif event == "partial_request":
            self._log.warning("policy_partial_request", peer_uid=peer.uid)

    # --- answering -----------------------------------------------------------

    def answer(self, payload: bytes, peer: Peer) -> bytes:
        """The reply to one well-framed request."""
        try:
            request = codec.parse_request(payload)
        except RequestError as problem:
            return self._rejected(str(problem), peer_uid=peer.uid)
        if request.protocol_state != RCPT_STATE:
            return self._rejected(
                "not a RCPT request",
                protocol_state=request.protocol_state[:32],
                hint="use check_policy_service for popauth in smtpd_relay_restrictions only",
            )
        if not request.recipient:
            return self._rejected("no recipient", peer_uid=peer.uid)
        transaction = self._transaction(peer, request)
        decision = transaction.settled
        if decision is None:
            message = transaction.message
            decision = self._gate.recipient(message, Recipient(request.recipient))
            if message.relayed_recipients > transaction.counted:
                transaction.counted = self._gate.count_relayed_now(message, transaction.counted)
        return self.reply_to(decision)

    def _rejected(self, error: str, **fields: object) -> bytes:
        """A request that cannot be judged: counted, logged, and a tempfail."""
        self._bad_requests.inc()
        self._log.warning("policy_rejected", error=error, **fields)
        return _FAILED

    def _transaction(self, peer: Peer, request: codec.Request) -> Transaction:
        """The message this RCPT belongs to; the sender is judged at its first."""
        key: TransactionKey = (
            request.instance,
            request.client_address,
            request.sasl_username,
            request.sender,
        )
        with self._lock:
            latest = self._transactions.get(peer.pid)
        if latest is not None and latest[0] == key and request.instance:
            return latest[1]
        settled, message = self._gate.message(
            _address(request.client_address), request.sasl_username, request.sender, door="policy"
        )
        transaction = Transaction(message, settled)
        with self._lock:
            # Re-inserted last: the oldest entries are the processes gone quiet.
            self._transactions.pop(peer.pid, None)
            self._transactions[peer.pid] = (key, transaction)
            if len(self._transactions) > self._max_transactions:
                del self._transactions[next(iter(self._transactions))]
        return transaction

    def reply_to(self, decision: Decision) -> bytes:
        """The action line for a verdict of the gate."""
        if decision.verdict is Verdict.ACCEPT:
            # Every accept but a local recipient's lets the client relay, as
            # through the milter (whatever reasons the gate learns later).
            return _DUNNO if decision.reason is Reason.LOCAL_RECIPIENT else _PERMIT
        refusal = self._replies.refusal(decision)
        if refusal is None:  # every refusal has its text; never a permit by accident
            return _FAILED
        line = self._refusal_lines.get(refusal)
        if line is None:
            line = self._refusal_lines[refusal] = codec.reply(str(refusal))
        return line

    def stopped(self) -> None:
        self._log.info("policy_stopped")


def _address(text: str) -> IPAddress | None:
    """Postfix's client_address; anything else is a client of no known address
    (a stranger to popauth, as the milter judges one)."""
    try:
        return parse_client_address(text)
    except AddressError:
        return None
