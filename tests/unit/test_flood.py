"""Silent and slow clients of another uid cannot starve the hook or the MTA.

500 silent clients (connect, say nothing) and 500 slow ones (one byte, then
nothing) run as ``nobody`` and reconnect as soon as they are dropped, while
the hook's user reports logins and the MTA's group looks addresses up.
"""

from __future__ import annotations

import grp
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from popauth.basics.addresses import WhitelistKeying, parse_client_address
from popauth.basics.posixids import system_group, system_user
from popauth.config import SocketmapSettings
from popauth.doors.ingest.roles import PeerPolicy
from popauth.doors.socketmap import codec
from popauth.doors.socketmap.server import SocketmapServer
from popauth.store.memory import MemoryStore
from popauth.telemetry.metrics import Metrics
from tests.support.clock import FakeClock
from tests.support.ingest_endpoint import Endpoint
from tests.support.logs import capturing_logger
from tests.support.peers import ask_as, needs_root, silent_clients_as

FLOOD = 500


@pytest.fixture
def ingest(open_tmp: Path) -> Iterator[Endpoint]:
    # The hook (dovecot) is a reporter; nobody holds no role.
    served = Endpoint(open_tmp, peers=PeerPolicy.of([system_user("dovecot")], []), timeout=5)
    served.server.start()
    yield served
    served.server.stop()


@needs_root
def test_logins_get_through_while_nobody_floods_the_ingest_socket(ingest: Endpoint) -> None:
    with (
        silent_clients_as("nobody", ingest.path, FLOOD) as silent,
        silent_clients_as("nobody", ingest.path, FLOOD, slow=True) as slow,
    ):
        assert silent + slow > 0
        for n in range(20):
            reply = ask_as("dovecot", ingest.path, f"LOGIN 192.0.2.{n + 1} alice")
            assert reply.startswith(f"OK address=192.0.2.{n + 1} user=alice"), (n, reply)
    assert ingest.store.stats().entries == 20


def test_a_silent_client_is_dropped_after_the_first_byte_timeout(ingest: Endpoint) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        # Well before the 5 s request timeout.
        silent.settimeout(3)
        silent.connect(str(ingest.path))
        assert silent.recv(100).startswith(b"ERR timeout")


@needs_root
def test_the_mta_is_answered_while_nobody_floods_the_socketmap(open_tmp: Path) -> None:
    path = open_tmp / "socketmap.sock"
    store = MemoryStore(ttl=900, max_entries=10, clock=FakeClock())
    store.grant(parse_client_address("192.0.2.1"), "alice")
    server = SocketmapServer(
        path=path,
        settings=SocketmapSettings(
            socket_mode=0o666,
            socket_group=system_group("postfix"),
            max_clients=100,
            clients_per_uid=8,
        ),
        store=store,
        keying=WhitelistKeying(128),
        metrics=Metrics(),
        log=capturing_logger()[0],
        lookup_events=False,
    )
    server.start()
    postfix_gid = grp.getgrnam("postfix").gr_gid
    lookup = codec.encode(b"popauth 192.0.2.1").decode()
    try:
        with (
            silent_clients_as("nobody", path, 600),
            silent_clients_as("nobody", path, 600, slow=True),
        ):
            for _ in range(20):
                # As smtpd does it: user and group postfix, a fresh connection.
                reply = ask_as("postfix", path, lookup.rstrip(), group=postfix_gid)
                assert reply.startswith("5:OK OK"), reply
    finally:
        server.stop()


@needs_root
def test_by_default_an_mta_reaching_the_socketmap_by_its_mode_is_not_throttled(
    open_tmp: Path,
) -> None:
    path = open_tmp / "socketmap.sock"
    store = MemoryStore(ttl=900, max_entries=10, clock=FakeClock())
    store.grant(parse_client_address("192.0.2.1"), "alice")
    server = SocketmapServer(
        path=path,
        settings=SocketmapSettings(socket_mode=0o666),
        store=store,
        keying=WhitelistKeying(128),
        metrics=Metrics(),
        log=capturing_logger()[0],
        lookup_events=False,
    )
    server.start()
    lookup = codec.encode(b"popauth 192.0.2.1").decode()
    try:
        # Many smtpd processes, each with its connection open.
        with silent_clients_as("postfix", path, 50) as held:
            assert held == 50
            assert ask_as("postfix", path, lookup).startswith("5:OK OK,")
    finally:
        server.stop()
