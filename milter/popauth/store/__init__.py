"""The whitelist of clients that logged in to the POP/IMAP server.

Every door reads or writes it through :class:`WhitelistStore`; the milter, the
ingest socket and the CLI never see how entries are kept.
"""

from popauth.store.base import (
    MAX_USERS_PER_ADDRESS,
    BudgetSpend,
    BudgetUse,
    EndedGrant,
    EndReason,
    Entry,
    Grant,
    GrantOutcome,
    NotConfirmed,
    Renewal,
    StoreKind,
    StoreSetupError,
    StoreStats,
    StoreUnavailable,
    UserBlocked,
    WhitelistStore,
)

__all__ = [
    "MAX_USERS_PER_ADDRESS",
    "BudgetSpend",
    "BudgetUse",
    "EndReason",
    "EndedGrant",
    "Entry",
    "Grant",
    "GrantOutcome",
    "NotConfirmed",
    "Renewal",
    "StoreKind",
    "StoreSetupError",
    "StoreStats",
    "StoreUnavailable",
    "UserBlocked",
    "WhitelistStore",
]
