"""Reporters, operators and administrators, each played by a real uid.

The peer's identity comes from SO_PEERCRED, so each request is sent by a
process that really runs as that user (see tests.support.peers): dovecot
is the hook (a reporter), daemon an operator, nobody a stranger, root an
administrator by default.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from popauth.basics.addresses import parse_client_address
from popauth.basics.posixids import system_group, system_user
from popauth.config import settings_from_mapping
from popauth.doors.ingest.protocol import Verb
from popauth.doors.ingest.roles import VERB_ROLES, PeerPolicy, Role
from popauth.doors.unixserver import _peer_groups, peer_of
from tests.support.ingest_endpoint import Endpoint
from tests.support.peers import ask_as, needs_root

# Every test here asks as another user.
pytestmark = needs_root

ADDRESS = parse_client_address("192.0.2.7")
REQUESTS = {
    "PING": "OK",
    "LOGIN 192.0.2.7 alice": "OK",
    "QUERY 192.0.2.7": "OK",
    "LIST": "OK",
    "REPORT": "OK",
    "BLOCKED": "OK",
    "STATS": "OK",
    "EXPLAIN 192.0.2.7 bob@remote.test": "OK",
    "REVOKE 192.0.2.7": "OK",
    "REVOKEUSER alice": "OK",
    "BLOCK mallory": "OK",
    "UNBLOCK mallory": "OK",
    "QUIT": "OK",
}

ALLOWED = {
    # Reporters report logins: they can neither read, nor revoke, nor block.
    "dovecot": {"PING", "QUIT", "LOGIN"},
    "daemon": {
        "PING",
        "QUIT",
        "QUERY",
        "LIST",
        "REPORT",
        "BLOCKED",
        "STATS",
        "EXPLAIN",
        "REVOKE",
        "REVOKEUSER",
    },
    "nobody": {"PING", "QUIT"},
    "root": {verb for verb in (line.split()[0] for line in REQUESTS)},
}


@pytest.fixture
def endpoint(open_tmp: Path) -> Iterator[Endpoint]:
    settings = settings_from_mapping(
        {"ingest_allowed_users": ["dovecot"], "ingest_operator_users": ["daemon"]}
    )
    peers = PeerPolicy.of(
        settings.ingest.allowed_users,
        settings.ingest.allowed_groups,
        operator_users=settings.ingest.operator_users,
    )
    served = Endpoint(open_tmp, peers=peers)
    served.server.start()
    yield served
    served.server.stop()


@pytest.mark.parametrize("user", sorted(ALLOWED))
def test_each_role_may_do_exactly_its_verbs(endpoint: Endpoint, user: str) -> None:
    for line in REQUESTS:
        # Something to find, to revoke and to unblock, so that success is "OK".
        endpoint.store.grant(ADDRESS, "alice")
        if line.startswith("UNBLOCK"):
            endpoint.blocklist.add("mallory")
        reply = ask_as(user, endpoint.path, line)
        verb = line.split()[0]
        if verb in ALLOWED[user]:
            assert reply.startswith("OK"), (user, line, reply)
        else:
            assert reply.startswith("ERR forbidden "), (user, line, reply)
    # The block the test set up stays, unless the peer may unblock.
    assert endpoint.blocklist.users() == ([] if user == "root" else ["mallory"])


def test_a_refused_request_changes_nothing(endpoint: Endpoint) -> None:
    assert ask_as("dovecot", endpoint.path, "LOGIN 192.0.2.8 bob").startswith("OK ")
    assert ask_as("nobody", endpoint.path, "LOGIN 192.0.2.9 eve").startswith("ERR forbidden")
    assert ask_as("dovecot", endpoint.path, "REVOKEUSER bob").startswith("ERR forbidden")
    assert [grant.user for grant in endpoint.store.entries()] == ["bob"]
    assert ask_as("dovecot", endpoint.path, "BLOCK bob").startswith("ERR forbidden")
    assert endpoint.blocklist.users() == []


def test_roles_by_group_and_configured_administrators(open_tmp: Path) -> None:
    daemon_group = grp.getgrnam("daemon").gr_gid
    peers = PeerPolicy.of(
        [],
        [],
        operator_groups=[system_group("daemon")],
        administrator_users=[system_user("nobody")],
    )
    served = Endpoint(open_tmp, peers=peers)
    served.server.start()
    try:
        # dovecot's user in the daemon group: an operator by group.
        assert ask_as("dovecot", served.path, "STATS", group=daemon_group).startswith("OK ")
        assert ask_as("dovecot", served.path, "LOGIN 192.0.2.1 a", group=daemon_group).startswith(
            "ERR forbidden"
        )
        assert ask_as("dovecot", served.path, "STATS").startswith("ERR forbidden")
        # A configured administrator may block.
        assert ask_as("nobody", served.path, "BLOCK mallory").startswith("OK ")
        assert served.blocklist.users() == ["mallory"]
    finally:
        served.server.stop()


def test_roles_by_supplementary_group(open_tmp: Path) -> None:
    """An operator whose operators' group is a supplementary one, as for
    anyone added to a group in /etc/group, holds the role; the groups are
    the connecting process's own, as the kernel keeps them."""
    daemon_group = grp.getgrnam("daemon").gr_gid
    peers = PeerPolicy.of([], [], operator_groups=[system_group("daemon")])
    served = Endpoint(open_tmp, peers=peers)
    served.server.start()
    try:
        assert ask_as("dovecot", served.path, "STATS", supplementary=[daemon_group]).startswith(
            "OK "
        )
        many = [*range(70_000, 70_255), daemon_group]
        assert ask_as("dovecot", served.path, "STATS", supplementary=many).startswith("OK ")
        assert ask_as("dovecot", served.path, "STATS", supplementary=many[:-1]).startswith(
            "ERR forbidden"
        )
        # More than 256: they are not read at all, only the primary group counts.
        too_many = [daemon_group, *range(70_000, 70_256)]
        assert ask_as("dovecot", served.path, "STATS", supplementary=too_many).startswith(
            "ERR forbidden"
        )
        assert ask_as(
            "dovecot", served.path, "STATS", group=daemon_group, supplementary=too_many
        ).startswith("OK ")
        # Still an operator only.
        assert ask_as("dovecot", served.path, "BLOCK x", supplementary=[daemon_group]).startswith(
            "ERR forbidden"
        )
    finally:
        served.server.stop()


def test_a_peer_without_supplementary_groups_has_none() -> None:
    """Where the kernel keeps no peer groups (not a UNIX socket), only the
    primary group counts."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as unconnected:
        assert _peer_groups(unconnected) == frozenset()
    left, right = socket.socketpair()
    with left, right:
        peer = peer_of(left)
    assert (peer.uid, peer.gid, peer.groups) == (
        os.getuid(),
        os.getgid(),
        frozenset(os.getgroups()),
    )


def test_root_and_our_own_user_are_always_administrators() -> None:
    policy = PeerPolicy.of([], [])
    assert policy.administrators.uids == {0, os.getuid()}
    assert pwd.getpwnam("root").pw_uid in policy.administrators.uids


def test_every_verb_has_a_role_and_a_new_one_is_closed() -> None:
    assert set(VERB_ROLES) == set(Verb)
    assert {verb for verb, role in VERB_ROLES.items() if role is None} == {Verb.PING, Verb.QUIT}
    reporting = {verb for verb, role in VERB_ROLES.items() if role is Role.REPORTER}
    assert reporting == {Verb.LOGIN, Verb.RENEW}
