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

from popauth.relay.decision import RelayPolicy
from popauth.relay.recipients import Recipient, classify

# Mailer words come from the MTA's transports and domains from the local
# classes, so the pairs are few; the cap only guards against the unforeseen.
MAX_REMEMBERED_PAIRS = 10_000


class MailerMismatchWarner:
    def __init__(self, log: structlog.typing.FilteringBoundLogger) -> None:
        self._log = log
        self._warned: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def check(self, policy: RelayPolicy, recipient: Recipient) -> None:
        if recipient.mailer is None:
            return
        found = classify(recipient, policy.local_delivery)
        if found is None or found.domain is None:
            return
        expected = found.delivery_class.expected_mailers(found.address)
        mailer = recipient.mailer.lower()
        pair = (mailer, found.domain)
        if mailer in expected or pair in self._warned:
            return
        with self._lock:
            if pair in self._warned or len(self._warned) >= MAX_REMEMBERED_PAIRS:
                return
            self._warned.add(pair)
        self._log.warning(
            "local_domain_with_foreign_mailer",
            rcpt_mailer=mailer,
            domain=found.domain,
            delivery_class=found.delivery_class.name,
            expected_mailers=sorted(expected),
            setting="local_mailers",
            hint=(
                f"mail to {found.domain} arrives with {{rcpt_mailer}}={mailer}, which is not"
                f" what popauth expects there ({', '.join(sorted(expected)) or 'nothing'}),"
                " so strangers' mail to it is refused as relaying; if"
                f" {mailer} delivers here, add it to local_mailers (or remove local_mailers"
                " to learn it from the MTA)"
            ),
        )
