"""The socketmap endpoint: the whitelist as a Postfix/Sendmail lookup table.

A second door to the same store as the milter. The MTA keeps its own relay
gate (Postfix ``reject_unauth_destination``, Sendmail's ``check_rcpt``) and
only asks "may this client relay?": a whitelisted client address answers
``OK <value>``, anything else ``NOTFOUND``. Keys are normalised exactly as
the milter does it (IPv4-mapped IPv6 is IPv4, an ``IPv6:`` tag is dropped,
IPv6 is cut to ``ipv6_prefix``).

Postfix's ``check_client_access`` also asks for the client host name
(``unknown`` when none), but never for partial keys such as an address
shortened by octets: a socketmap is a pattern table to it, like ``cidr:``
(socketmap_table(5)). Every key that is not a whole IP address (a host
name, ``unknown``, anything a client of the socket may send) is
``NOTFOUND`` at once, without touching the store.

Fail closed: a store that cannot answer gives ``TEMP``; bad input ``PERM``.
Connections are persistent (both MTAs keep one per process), bounded in
request size, time and number.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import structlog

from popauth.basics.addresses import (
    AddressError,
    IPAddress,
    WhitelistKeying,
    parse_client_address,
)
from popauth.doors.socketmap import codec
from popauth.doors.socketmap.codec import NetstringError, RequestError, Status
from popauth.doors.unixserver import FramingError, MtaDoor, MtaSocketOptions, Peer
from popauth.store import Entry, StoreUnavailable, WhitelistStore
from popauth.telemetry.metrics import Metrics


class SocketmapOptions(MtaSocketOptions, Protocol):
    """What the socketmap door reads from its settings group (``settings.socketmap``).

    ``clients_per_uid`` is off by default: an MTA that reaches the socket
    through its mode, not its group, must never be throttled.
    """

    # The map name the MTA sends, and the value a whitelisted client gets.
    @property
    def name(self) -> str: ...
    @property
    def ok_value(self) -> str: ...


class SocketmapServer(MtaDoor):
    def __init__(
        self,
        *,
        path: Path,
        settings: SocketmapOptions,
        store: WhitelistStore,
        keying: WhitelistKeying,
        metrics: Metrics,
        log: structlog.typing.FilteringBoundLogger,
        lookup_events: bool,
        refusal: Callable[[IPAddress, Entry], str | None] | None = None,
    ) -> None:
        """``refusal``: the reason POP-first refuses a listed address now
        (``pop_first_retired``, ``pop_first_graduated``; None: it relays), as
        the milter's decision gives it."""
        super().__init__(
            path=path,
            settings=settings,
            timeout_reply=codec.reply(Status.TIMEOUT, "no complete request in time"),
            busy_reply=codec.reply(Status.TEMP, "too many clients, try again"),
            internal_reply=codec.reply(Status.TEMP, "lookup failed"),
            blocking_calls=store.may_block,
            thread_name="popauth-socketmap",
            log=log.bind(door="socketmap"),
        )
        self._store = store
        self._keying = keying
        self._name = settings.name
        self._ok = codec.reply(Status.OK, settings.ok_value)
        self._notfound = codec.reply(Status.NOTFOUND)
        self._metrics = metrics
        # Per-lookup events are debug only (the caller knows the log level:
        # structlog 22.3's bound loggers cannot be asked); not building them
        # otherwise keeps a lookup cheap.
        self._lookup_events = lookup_events
        self._refusal = refusal

    def stopped(self) -> None:
        # The counts Prometheus reads (this server is the only socketmap).
        self._log.info("socketmap_stopped", **self._metrics.socketmap_totals())

    # --- framing -----------------------------------------------------------

    def split_request(self, buffer: bytearray) -> tuple[bytes, int] | None:
        try:
            return codec.split_first(buffer, codec.MAX_REQUEST)
        except NetstringError as problem:
            # The stream cannot be resynchronised: PERM, then close.
            raise FramingError(
                codec.reply(Status.PERM, f"bad netstring: {problem}"), str(problem)
            ) from None

    def answer_request(self, request: bytes, peer: Peer) -> tuple[bytes, bool]:
        return self.answer(request), True

    def note(self, event: str, peer: Peer) -> None:
        if event == "evicted":
            self._log.debug("socketmap_idle_client_closed", peer_uid=peer.uid)
        elif event == "framing_error":
            self._metrics.socketmap_request("perm")
            self._log.warning("socketmap_rejected", error="bad netstring")
        elif event == "busy":
            self._metrics.socketmap_request("busy")
            self._log.warning("socketmap_busy", clients=self.clients)
        elif event == "timeout":
            self._metrics.socketmap_request("timeouts")
            self._log.warning("socketmap_timeout")
        elif event == "partial_request":
            self._log.warning("socketmap_partial_request")
        # An idle persistent connection simply ends: nothing to note.

    def answer(self, payload: bytes) -> bytes:
        """The reply netstring to one well-framed request payload."""
        try:
            request = codec.parse_request(payload)
        except RequestError as problem:
            self._metrics.socketmap_answer("perm")
            self._log.warning("socketmap_rejected", error=str(problem))
            return codec.reply(Status.PERM, str(problem))
        if request.name != self._name:
            self._metrics.socketmap_answer("perm")
            self._log.warning("socketmap_rejected", error="unknown map", map=request.name[:64])
            return codec.reply(Status.PERM, "unknown map")
        try:
            address = parse_client_address(request.key)
        except AddressError:
            # A host name, "unknown", or anything else that is no address.
            self._metrics.socketmap_answer("not_an_address")
            return self._notfound
        key = self._keying.key_address(address)
        try:
            grant = self._store.lookup(key)
            refused = (
                None if grant is None or self._refusal is None else self._refusal(address, grant)
            )
        except StoreUnavailable as failure:
            self._metrics.socketmap_answer("temp")
            self._log.warning("socketmap_store_unavailable", error=str(failure))
            return codec.reply(Status.TEMP, "whitelist store unavailable")
        except Exception:
            self._metrics.socketmap_answer("temp")
            self._log.exception("socketmap_lookup_failed")
            return codec.reply(Status.TEMP, "lookup failed")
        if grant is None:
            self._metrics.socketmap_answer("misses")
            if self._lookup_events:
                self._log.debug("socketmap_lookup", client_ip=self._keying.describe(key), hit=False)
            return self._notfound
        # Listed, but POP-first may no longer relay it: then the MTA's own refusal.
        self._metrics.socketmap_answer("hits" if refused is None else "misses")
        if self._lookup_events:
            self._log.debug(
                "socketmap_lookup",
                client_ip=self._keying.describe(key),
                hit=refused is None,
                user=grant.user,
                users=list(grant.users),
                **({} if refused is None else {"reason": refused}),
            )
        return self._ok if refused is None else self._notfound
