"""What the usage ledger counts: a choice the settings and the gate share.

Standard library only, so that loading the settings (as the client side of
``popauth`` does, with the system Python) needs no logging library.
"""

from __future__ import annotations

import enum


class Accounting(enum.Enum):
    """What the usage ledger counts for authenticated and whitelisted clients."""

    # Messages only: the milter accepts them at MAIL FROM, the cheapest way.
    MESSAGES = "messages"
    # Messages and relayed recipients: the milter must see every RCPT,
    # which costs the MTA one round trip per recipient and one per message.
    RECIPIENTS = "recipients"
