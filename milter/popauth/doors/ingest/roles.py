"""Who may do what on the ingest socket: three roles, checked per request.

The peer's user and groups come from ``SO_PEERCRED`` and ``SO_PEERGROUPS``,
read once per connection, so they cannot be forged by the client. A role
given to a group counts for its members whether it is their primary or a
supplementary group, as the kernel holds them for the connecting process.

- **Reporters** (the POP/IMAP server's login hook) may report logins
  (``LOGIN``, ``RENEW``) and nothing else: a compromised hook user can
  whitelist addresses, which is its job, but cannot see who is where,
  revoke others or lift a block.
- **Operators** (monitoring, help desk) may read (``QUERY``, ``LIST``,
  ``REPORT``, ``BLOCKED``, ``STATS``, ``EXPLAIN``) and revoke (``REVOKE``,
  ``REVOKEUSER``).
- **Administrators** may do everything, including ``BLOCK`` and ``UNBLOCK``.
  Root and the user popauth runs as always are administrators.

``PING`` and ``QUIT`` are open to anyone who can connect. A verb that is not
listed here is for administrators only: a new verb is closed until someone
decides who may use it.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from popauth.basics.posixids import SystemGroup, SystemUser
from popauth.doors.ingest.protocol import Verb
from popauth.doors.unixserver import Peer


class Role(enum.Enum):
    REPORTER = "reporter"
    OPERATOR = "operator"
    ADMINISTRATOR = "administrator"


# None: open to every peer that can connect.
VERB_ROLES: dict[Verb, Role | None] = {
    Verb.PING: None,
    Verb.QUIT: None,
    Verb.LOGIN: Role.REPORTER,
    Verb.RENEW: Role.REPORTER,
    Verb.QUERY: Role.OPERATOR,
    Verb.LIST: Role.OPERATOR,
    Verb.REPORT: Role.OPERATOR,
    Verb.BLOCKED: Role.OPERATOR,
    Verb.STATS: Role.OPERATOR,
    Verb.EXPLAIN: Role.OPERATOR,
    Verb.REVOKE: Role.OPERATOR,
    Verb.REVOKEUSER: Role.OPERATOR,
    Verb.BLOCK: Role.ADMINISTRATOR,
    Verb.UNBLOCK: Role.ADMINISTRATOR,
    Verb.REINSTATE: Role.ADMINISTRATOR,
}


def required_role(verb: Verb) -> Role | None:
    return VERB_ROLES.get(verb, Role.ADMINISTRATOR)


@dataclass(frozen=True, slots=True)
class Members:
    """The users and groups that hold one role."""

    uids: frozenset[int]
    gids: frozenset[int]

    @classmethod
    def of(
        cls,
        users: Iterable[SystemUser],
        groups: Iterable[SystemGroup],
        *,
        also: Iterable[int] = (),
    ) -> Members:
        uids = {*also, *(user.uid for user in users)}
        return cls(frozenset(uids), frozenset(group.gid for group in groups))

    def include(self, peer: Peer) -> bool:
        return peer.uid in self.uids or peer.in_group(self.gids)


_NOBODY = Members(frozenset(), frozenset())

_REFUSALS = {
    Role.REPORTER: "only reporters (ingest_allowed_users/groups) may report logins",
    Role.OPERATOR: "only operators (ingest_operator_users/groups) may read or revoke",
    Role.ADMINISTRATOR: "only administrators (ingest_admin_users/groups) may do this",
}


class RoleOptions(Protocol):
    """Who holds which role, as the settings say (``settings.ingest``)."""

    @property
    def allowed_users(self) -> tuple[SystemUser, ...]: ...
    @property
    def allowed_groups(self) -> tuple[SystemGroup, ...]: ...
    @property
    def operator_users(self) -> tuple[SystemUser, ...]: ...
    @property
    def operator_groups(self) -> tuple[SystemGroup, ...]: ...
    @property
    def admin_users(self) -> tuple[SystemUser, ...]: ...
    @property
    def admin_groups(self) -> tuple[SystemGroup, ...]: ...


@dataclass(frozen=True, slots=True)
class PeerPolicy:
    """The members of each role; administrators may do what every role may."""

    reporters: Members
    operators: Members = _NOBODY
    administrators: Members = _NOBODY

    @classmethod
    def of(
        cls,
        reporter_users: Iterable[SystemUser],
        reporter_groups: Iterable[SystemGroup],
        *,
        operator_users: Iterable[SystemUser] = (),
        operator_groups: Iterable[SystemGroup] = (),
        administrator_users: Iterable[SystemUser] = (),
        administrator_groups: Iterable[SystemGroup] = (),
    ) -> PeerPolicy:
        return cls(
            reporters=Members.of(reporter_users, reporter_groups),
            operators=Members.of(operator_users, operator_groups),
            administrators=Members.of(
                administrator_users, administrator_groups, also=(0, os.getuid())
            ),
        )

    @classmethod
    def of_roles(cls, roles: RoleOptions) -> PeerPolicy:
        return cls.of(
            roles.allowed_users,
            roles.allowed_groups,
            operator_users=roles.operator_users,
            operator_groups=roles.operator_groups,
            administrator_users=roles.admin_users,
            administrator_groups=roles.admin_groups,
        )

    def holds_a_role(self, peer: Peer) -> bool:
        return any(
            members.include(peer)
            for members in (self.reporters, self.operators, self.administrators)
        )

    def refusal(self, verb: Verb, peer: Peer) -> str | None:
        """Why ``peer`` may not use ``verb``, or None if it may."""
        role = required_role(verb)
        if role is None or self.administrators.include(peer):
            return None
        if role is Role.REPORTER and self.reporters.include(peer):
            return None
        if role is Role.OPERATOR and self.operators.include(peer):
            return None
        return _REFUSALS[role]
