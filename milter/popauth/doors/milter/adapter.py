"""The pymilter adapter: MTA callbacks in, relay verdicts out, nothing more.

Round trips are what a milter costs the MTA, so the adapter negotiates away
every callback the decision does not use (HELO, headers, body, DATA,
unknown commands) and answers with a final verdict as early as it is known:

- a trusted client is accepted at CONNECT, for the whole connection; with
  no trusted networks CONNECT is answered with no reply at all (the MTA
  does not wait for one);
- an authenticated or whitelisted client is accepted at MAIL, for that
  message only, so the next MAIL on the same connection is checked again;
- otherwise each RCPT is judged; an accepted local recipient gets CONTINUE,
  never ACCEPT, because ACCEPT at RCPT would wave through the recipients
  that follow it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import Milter
import structlog

from popauth.basics.addresses import AddressError, IPAddress, parse_client_address
from popauth.doors.milter.macros import as_text, macro_text
from popauth.relay.decision import Decision, Verdict, decides_at_connection
from popauth.relay.gate import Message, RelayGate
from popauth.relay.recipients import Recipient
from popauth.relay.replies import CHECK_FAILED, Replies
from popauth.telemetry.metrics import Metrics

# Replies is part of what building a RelayMilter takes.
__all__ = ["SYMBOL_LISTS", "RelayMilter", "Replies", "client_address_of", "register_milter"]

# The macros each stage needs. Asking for them (SMFIF_SETSYMLIST) makes an MTA
# send them even where its configured macro lists lack them, and nothing else.
SYMBOL_LISTS: dict[int, str] = {
    Milter.M_CONNECT: "{client_addr}",
    Milter.M_ENVFROM: "{auth_authen}",
    Milter.M_ENVRCPT: "{rcpt_mailer} {rcpt_addr} {rcpt_host}",
}

_Callback = TypeVar("_Callback", bound=Callable[..., int])
_ACCEPT = int(Milter.ACCEPT)
_CONTINUE = int(Milter.CONTINUE)
_REJECT = int(Milter.REJECT)
_TEMPFAIL = int(Milter.TEMPFAIL)
_NOREPLY = int(Milter.NOREPLY)


def fail_closed(callback: _Callback) -> _Callback:
    """Answer TEMPFAIL when a callback breaks: never let mail through by accident."""

    @functools.wraps(callback)
    def guarded(self: RelayMilter, *args: Any) -> int:
        try:
            return callback(self, *args)
        except Exception:
            self.metrics.errors.labels("milter_callback").inc()
            self.log.exception("milter_callback_failed", callback=callback.__name__.lstrip("_"))
            self.setreply(CHECK_FAILED.code, CHECK_FAILED.status, CHECK_FAILED.text)
            return int(Milter.TEMPFAIL)

    return guarded  # type: ignore[return-value]


def client_address_of(hostaddr: object) -> IPAddress | None:
    """The IP address in connect()'s hostaddr, or None (UNIX socket, unknown)."""
    if isinstance(hostaddr, tuple) and hostaddr and isinstance(hostaddr[0], str):
        try:
            return parse_client_address(hostaddr[0])
        except AddressError:
            return None
    return None


class RelayMilter(Milter.Base):  # type: ignore[misc]
    def __init__(
        self,
        gate: RelayGate,
        replies: Replies,
        metrics: Metrics,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self._gate = gate
        self._replies = replies
        self.metrics = metrics
        self.log = log
        self._address: IPAddress | None = None
        self._message: Message | None = None

    def negotiate(self, opts: list[int]) -> int:
        offered_actions, offered_protocol, _, _ = opts
        # pymilter's own symlist support passes bytes the C module rejects
        # and then silently drops every protocol option, so do it here.
        self._actions = offered_actions & Milter.SETSYMLIST
        if self._actions:
            for stage, macros in SYMBOL_LISTS.items():
                self._ctx.setsymlist(stage, macros)
        opts[0] = self._actions
        protocol = offered_protocol & ~self.protocol_mask()
        if not decides_at_connection(self._gate.policy):
            # CONNECT can only go on: the MTA need not wait for its answer.
            protocol |= offered_protocol & Milter.P_NR_CONN
        opts[1] = self._protocol = protocol
        opts[2] = 0
        opts[3] = 0
        return int(Milter.CONTINUE)

    def connect(self, hostname: str, family: int, hostaddr: object) -> int:
        if not self._protocol & Milter.P_NR_CONN:
            return self._connect(hostaddr)
        # Negotiated without trusted networks (were there any by now, MAIL
        # would accept their clients: decide_sender checks them too). Any
        # answer but NOREPLY would be read by the MTA as the answer to its
        # next command, so nothing may escape: a client whose address is not
        # known is a stranger, who may not relay.
        try:
            self._address = client_address_of(hostaddr)
        except Exception:
            self._address = None
            with contextlib.suppress(Exception):
                self.metrics.errors.labels("milter_callback").inc()
                self.log.exception("milter_callback_failed", callback="connect")
        return _NOREPLY

    @fail_closed
    def _connect(self, hostaddr: object) -> int:
        self._address = client_address_of(hostaddr)
        if self._gate.connection(self._address) is not None:
            return _ACCEPT
        return _CONTINUE

    def envfrom(self, sender: str, *parameters: str) -> int:
        return self.mail(sender)

    @fail_closed
    def mail(self, sender: str | None = None) -> int:
        """MAIL FROM: who sends, and as whom (``pop_first_sender``); not the parameters."""
        # Macros as the MTA sent them: pymilter's getsymval fails on 8-bit text.
        auth_user = macro_text(self._ctx, "{auth_authen}") or ""
        decision, self._message = self._gate.message(self._address, auth_user, sender)
        return _ACCEPT if decision is not None else _CONTINUE

    @fail_closed
    def envrcpt(self, recipient: str, *parameters: str) -> int:
        message = self._message or self._gate.message_without_mail(self._address)
        context = self._ctx
        rcpt = Recipient(
            recipient, macro_text(context, "{rcpt_mailer}"), macro_text(context, "{rcpt_addr}")
        )
        return self._reply(self._gate.recipient(message, rcpt))

    def _reply(self, decision: Decision) -> int:
        verdict = decision.verdict
        if verdict is Verdict.ACCEPT:
            return _CONTINUE
        reply = self._replies.refusal(decision)
        assert reply is not None  # every refusal has its text
        # Straight to the context: Milter.Base.setreply checks each text for
        # a lone '%' every time, and the configuration already refuses one.
        self._ctx.setreply(reply.code, reply.status, reply.text)
        return _TEMPFAIL if verdict is Verdict.TEMPFAIL else _REJECT

    def abort(self) -> int:
        # The transaction ended without its data: nothing of it is counted.
        self._message = None
        return _CONTINUE

    def eom(self) -> int:
        message, self._message = self._message, None
        if message is not None:
            # The recipients were judged already: a failure to count must not
            # hold the message up, only be seen.
            try:
                self._gate.message_sent(message)
            except Exception:
                self.metrics.errors.labels("milter_callback").inc()
                self.log.exception("milter_callback_failed", callback="eom")
        return _CONTINUE

    def close(self) -> int:
        return int(Milter.CONTINUE)


MilterFactory = Callable[[], RelayMilter]


def register_milter(*, name: str, spec: str, timeout: int, factory: MilterFactory) -> None:
    """Tell libmilter what to serve: ``factory``'s milters, on ``spec``.

    Like the first half of ``Milter.runmilter``, but the factory is passed in
    rather than set as a module global. Listening and serving are
    :class:`popauth.doors.milter.service.MilterService`'s part.
    """
    import milter as libmilter  # pymilter's C module

    def negotiate(ctx: Any, opts: list[int]) -> int:
        instance = factory()
        instance._setctx(ctx)
        return instance.negotiate(opts)

    def connect(ctx: Any, hostname: str, family: int, hostaddr: object) -> int:
        instance = ctx.getpriv()
        if instance is None:  # an MTA that skips option negotiation
            instance = factory()
            instance._setctx(ctx)
        return int(instance.connect(hostname, family, hostaddr))

    def close(ctx: Any) -> int:
        instance = ctx.getpriv()
        if instance is None:
            return int(Milter.CONTINUE)
        try:
            return int(instance.close())
        finally:
            instance._setctx(None)

    libmilter.set_exception_policy(libmilter.TEMPFAIL)
    libmilter.set_flags(libmilter.SETSYMLIST)
    libmilter.set_connect_callback(connect)
    # Milter.Base's envfrom_bytes and envrcpt_bytes decode every argument;
    # the ESMTP parameters are never read, so only the sender and the
    # recipient are decoded (losslessly, like the macros).
    libmilter.set_envfrom_callback(lambda ctx, sender, *args: ctx.getpriv().mail(as_text(sender)))
    libmilter.set_envrcpt_callback(
        lambda ctx, recipient, *args: ctx.getpriv().envrcpt(as_text(recipient))
    )
    libmilter.set_eom_callback(lambda ctx: ctx.getpriv().eom())
    libmilter.set_abort_callback(lambda ctx: ctx.getpriv().abort())
    libmilter.set_close_callback(close)
    libmilter.setconn(spec)
    libmilter.settimeout(timeout)
    libmilter.register(name, negotiate=negotiate)
