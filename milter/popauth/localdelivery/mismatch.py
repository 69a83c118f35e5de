"""One warning per (mailer, domain) when a local domain arrives with a foreign mailer.

A recipient plainly in a local domain whose ``{rcpt_mailer}`` popauth does not
count as local is refused to strangers as relaying. That is right for a
mailer that really sends mail on, and wrong for one that delivers here (an
``lmtp`` transport missing from ``local_mailers``): the operator must be told,
once, not at every message.
"""

from __future__ import annotations

import threading

import structlog

from popauth.decision import RelayPolicy
from popauth.recipients import Recipient, plain_address_parts

# Mailer words come from the MTA's transports and domains from the local
# list, so the pairs are few; the cap only guards against the unforeseen.
MAX_REMEMBERED_PAIRS = 10_000


class MailerMismatchWarner:
    def __init__(self, log: structlog.typing.FilteringBoundLogger) -> None:
        self._log = log
        self._warned: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def check(self, policy: RelayPolicy, recipient: Recipient) -> None:
        mailer = recipient.mailer
        if mailer is None or mailer.lower() in policy.local_mailers:
            return
        # Cheap tests first: this runs for every refused recipient.
        domain = recipient.envelope.rstrip(">").rpartition("@")[2].rstrip(".").lower()
        pair = (mailer.lower(), domain)
        if not domain or pair in self._warned or domain not in policy.local_domains:
            return
        if _plain_local_domain(recipient.envelope, policy) != domain or (
            recipient.resolved is not None
            and _plain_local_domain(recipient.resolved, policy) is None
        ):
            return
        with self._lock:
            if pair in self._warned or len(self._warned) >= MAX_REMEMBERED_PAIRS:
                return
            self._warned.add(pair)
        self._log.warning(
            "local_domain_with_foreign_mailer",
            rcpt_mailer=pair[0],
            domain=domain,
            setting="local_mailers",
            hint=(
                f"mail to {domain} arrives with {{rcpt_mailer}}={pair[0]}, which is not in"
                f" local_mailers, so strangers' mail to it is refused as relaying; if"
                f" {pair[0]} delivers here, add it to local_mailers (or remove local_mailers"
                " to learn it from the MTA)"
            ),
        )


def _plain_local_domain(address: str, policy: RelayPolicy) -> str | None:
    parts = plain_address_parts(address)
    if parts is None or parts[1] is None:
        return None
    domain = parts[1].rstrip(".").lower()
    return domain if domain in policy.local_domains else None
