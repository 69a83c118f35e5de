"""The relay gate: the pure decision joined with the store and the log.

Everything the milter adapter needs, minus pymilter: the adapter turns MTA
callbacks into calls here and verdicts into milter replies, nothing more.
"""

from __future__ import annotations

import structlog

from popauth.addresses import IPAddress, WhitelistKeying
from popauth.decision import (
    Client,
    Decision,
    Listing,
    RelayPolicy,
    decide_connection,
    decide_recipient,
    decide_sender,
    needs_whitelist,
)
from popauth.recipients import Recipient
from popauth.store import StoreUnavailable, WhitelistStore


class RelayGate:
    def __init__(
        self,
        *,
        policy: RelayPolicy,
        store: WhitelistStore,
        keying: WhitelistKeying,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self._policy = policy
        self._store = store
        self._keying = keying
        self._log = log.bind(door="milter")

    def connection(self, address: IPAddress | None) -> Decision | None:
        """A verdict for the whole SMTP connection, or None."""
        decision = decide_connection(self._policy, address)
        if decision is not None:
            self._log_decision(decision, "connect", Client(address))
        return decision

    def message(self, address: IPAddress | None, auth_user: str) -> tuple[Decision | None, Client]:
        """A verdict for every recipient of one message, or None; and the client."""
        client = Client(address, auth_user, *self._listing(address, auth_user))
        decision = decide_sender(self._policy, client)
        if decision is not None:
            self._log_decision(decision, "mail", client)
        return decision, client

    def recipient(self, client: Client, recipient: Recipient) -> Decision:
        decision = decide_recipient(self._policy, client, recipient)
        self._log_decision(decision, "rcpt", client, recipient)
        return decision

    def _listing(self, address: IPAddress | None, auth_user: str) -> tuple[Listing, str]:
        if address is None or not needs_whitelist(self._policy, address, auth_user):
            return Listing.NOT_CONSULTED, ""
        try:
            grant = self._store.lookup(self._keying.key_address(address))
        except StoreUnavailable as failure:
            self._log.error("whitelist_unavailable", client_ip=str(address), error=str(failure))
            return Listing.UNAVAILABLE, ""
        if grant is None:
            return Listing.NOT_LISTED, ""
        return Listing.LISTED, grant.user

    def _log_decision(
        self, decision: Decision, stage: str, client: Client, recipient: Recipient | None = None
    ) -> None:
        self._log.info(
            "relay_decision",
            verdict=decision.verdict.value,
            reason=decision.reason.value,
            stage=stage,
            client_ip=None if client.address is None else str(client.address),
            user=client.auth_user or client.login_user or None,
            recipient=None if recipient is None else recipient.envelope,
            rcpt_mailer=None if recipient is None else recipient.mailer,
        )
