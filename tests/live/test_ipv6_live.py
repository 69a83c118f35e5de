"""IPv6 end to end: clients with IPv6 addresses log in and relay through real MTAs.

Everything with an IP address runs in a private network namespace holding
only documentation addresses (tests.live.netns): Dovecot (POP3 and IMAP,
with the real hook), Postfix through the milter door and through the
socketmap door, Sendmail through the milter door, and the clients. popauth
runs outside it and is reached over UNIX sockets, as in production; each
case runs with the memory store and with the Redis store.

Run with ``-s`` to see the replies.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.dovecot import DovecotInstance, imap_login, pop3_login
from harness.popauth import PopauthServer
from harness.ports import free_port
from harness.postfix import PostfixInstance, contrib_relay_restrictions
from harness.redis import RedisInstance
from harness.sendmail import (
    CONTRIB_MC,
    DEFAULT_CACHE_DIR,
    SendmailInstance,
    ensure_sendmail_root,
    wrap_contrib_mc,
)
from harness.shared_runtime import shared_runtime
from harness.smtp import REMOTE, rcpt_reply
from tests.live.conftest import LIVE_SETTINGS, USERS
from tests.live.netns import NetworkNamespace

pytestmark = pytest.mark.live

SERVER6 = "2001:db8::1"
SERVER4 = "192.0.2.1"
POP_CLIENT = "2001:db8::5"
IMAP_CLIENT = "2001:db8::6"
STRANGER = "2001:db8::7"
# ipv6_prefix = 64: two addresses of one /64, one of another.
PRIVACY_A = "2001:db8:0:1::a"
PRIVACY_B = "2001:db8:0:1::b"
OTHER_64 = "2001:db8:0:2::a"
# One dual-stack client: an IPv4 and an IPv6 address.
DUAL4 = "192.0.2.5"
DUAL6 = "2001:db8::55"
ADDRESSES = [
    SERVER6,
    SERVER4,
    POP_CLIENT,
    IMAP_CLIENT,
    STRANGER,
    PRIVACY_A,
    PRIVACY_B,
    OTHER_64,
    DUAL4,
    DUAL6,
]


@pytest.fixture(scope="module")
def namespace() -> Iterator[NetworkNamespace]:
    with NetworkNamespace(ADDRESSES) as made:
        yield made


@pytest.fixture(scope="module")
def v6_dir(live_root: Path) -> Path:
    directory = live_root / "ipv6"
    directory.mkdir(mode=0o755)
    return directory


@pytest.fixture(scope="module")
def dovecot6(namespace: NetworkNamespace, v6_dir: Path) -> Iterator[DovecotInstance]:
    instance = DovecotInstance(
        root=v6_dir / "dovecot",
        pop3_port=free_port(),
        imap_port=free_port(),
        users=USERS,
        # Dovecot's hook user runs these: copies it can reach (see shared_runtime).
        postlogin_hook=shared_runtime().hook,
        hook_env={
            "POPAUTH": str(shared_runtime().popauth),
            "POPAUTH_SOCKET": str(v6_dir / "ingest.sock"),
        },
        listen=f"{SERVER6}, {SERVER4}",
    )
    with namespace.inside():
        instance.start()
    yield instance
    instance.stop()


def postfix_in(namespace: NetworkNamespace, root: Path, **options: Any) -> PostfixInstance:
    instance = PostfixInstance(
        root=root,
        smtp_port=free_port(),
        local_domain="local.test",
        listen=f"{SERVER6}, {SERVER4}",
        extra_main_cf={"myhostname": "mx.local.test", "myorigin": "local.test"},
        **options,
    )
    with namespace.inside():
        instance.start()
    return instance


@pytest.fixture(scope="module")
def postfix_milter(namespace: NetworkNamespace, v6_dir: Path) -> Iterator[PostfixInstance]:
    instance = postfix_in(
        namespace, v6_dir / "postfix-milter", milter=f"unix:{v6_dir / 'milter.sock'}"
    )
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def postfix_socketmap(namespace: NetworkNamespace, v6_dir: Path) -> Iterator[PostfixInstance]:
    instance = postfix_in(
        namespace,
        v6_dir / "postfix-socketmap",
        milter=None,
        relay_restrictions=contrib_relay_restrictions(v6_dir / "socketmap.sock"),
    )
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def sendmail6(namespace: NetworkNamespace, v6_dir: Path) -> Iterator[SendmailInstance]:
    root = ensure_sendmail_root(DEFAULT_CACHE_DIR)
    workdir = v6_dir / "sendmail"
    port = free_port()
    mc = wrap_contrib_mc(
        CONTRIB_MC.read_text(),
        workdir,
        port,
        milter_socket=f"unix:{v6_dir / 'milter.sock'}",
        local_domains="local.test",
        listen=SERVER6,
    )
    instance = SendmailInstance(root, workdir, port, mc, listen=SERVER6)
    with namespace.inside():
        instance.start()
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def redis_server(v6_dir: Path) -> Iterator[RedisInstance]:
    # Outside the namespace, beside popauth: only the mail traffic is IPv6.
    with RedisInstance(root=v6_dir / "redis", port=free_port()) as server:
        yield server


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest, redis_server: RedisInstance) -> dict[str, Any]:
    if request.param == "redis":
        redis_server.flush()
        return {"store": "redis", "redis_url": redis_server.url}
    return {"store": "memory"}


@pytest.fixture
def start_popauth(v6_dir: Path, store: dict[str, Any]) -> Iterator[Any]:
    started: list[PopauthServer] = []

    def start(**overrides: Any) -> PopauthServer:
        server = PopauthServer(
            v6_dir,
            **{
                **LIVE_SETTINGS,
                **store,
                "socketmap_socket": str(v6_dir / "socketmap.sock"),
                "socketmap_socket_mode": "0666",
                **overrides,
            },
        ).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


class Doors:
    """Relay through each door, from inside the namespace."""

    def __init__(
        self,
        namespace: NetworkNamespace,
        postfix_milter: PostfixInstance,
        postfix_socketmap: PostfixInstance,
        sendmail: SendmailInstance,
    ) -> None:
        self.namespace = namespace
        self.doors = {
            "postfix milter": postfix_milter.smtp_port,
            "postfix socketmap": postfix_socketmap.smtp_port,
        }
        self.sendmail_port = sendmail.smtp_port

    def relay(self, client: str, *, sendmail: bool = True) -> dict[str, tuple[int, str]]:
        server = SERVER6 if ":" in client else SERVER4
        replies = {}
        with self.namespace.inside():
            for name, port in self.doors.items():
                replies[name] = rcpt_reply(port, client, REMOTE, server)
            if sendmail:
                replies["sendmail milter"] = rcpt_reply(self.sendmail_port, client, REMOTE, server)
        for name, (code, text) in replies.items():
            print(f"{client:>18} via {name:<17}: {code} {text}")
        return replies


@pytest.fixture
def doors(
    namespace: NetworkNamespace,
    postfix_milter: PostfixInstance,
    postfix_socketmap: PostfixInstance,
    sendmail6: SendmailInstance,
) -> Doors:
    return Doors(namespace, postfix_milter, postfix_socketmap, sendmail6)


def codes(replies: dict[str, tuple[int, str]]) -> set[int]:
    return {code for code, _ in replies.values()}


def refused(replies: dict[str, tuple[int, str]]) -> bool:
    return all(code == 550 and text.startswith("5.7.1") for code, text in replies.values())


def test_pop3_and_imap_logins_over_ipv6_relay_a_stranger_does_not(
    namespace: NetworkNamespace,
    dovecot6: DovecotInstance,
    doors: Doors,
    start_popauth: Any,
) -> None:
    popauth = start_popauth()
    assert refused(doors.relay(POP_CLIENT))
    with namespace.inside():
        assert pop3_login(dovecot6.pop3_port, "alice", USERS["alice"], POP_CLIENT, SERVER6)
        assert dovecot6.imap_port is not None
        assert imap_login(dovecot6.imap_port, "bob", USERS["bob"], IMAP_CLIENT, SERVER6)
    assert codes(doors.relay(POP_CLIENT)) == {250}
    assert codes(doors.relay(IMAP_CLIENT)) == {250}
    assert refused(doors.relay(STRANGER))
    # The hook reported the IPv6 address as Dovecot saw it.
    logins = popauth.events("login")
    assert {(event["client_ip"], event["user"]) for event in logins} >= {
        (POP_CLIENT, "alice"),
        (IMAP_CLIENT, "bob"),
    }, logins


def test_ipv6_prefix_64_covers_the_same_64_only(
    namespace: NetworkNamespace,
    dovecot6: DovecotInstance,
    doors: Doors,
    start_popauth: Any,
) -> None:
    start_popauth(ipv6_prefix=64)
    with namespace.inside():
        assert pop3_login(dovecot6.pop3_port, "alice", USERS["alice"], PRIVACY_A, SERVER6)
    assert codes(doors.relay(PRIVACY_A)) == {250}
    assert codes(doors.relay(PRIVACY_B)) == {250}  # a new privacy address, same /64
    assert refused(doors.relay(OTHER_64))


def test_dual_stack_logins_whitelist_only_their_own_family(
    namespace: NetworkNamespace,
    dovecot6: DovecotInstance,
    doors: Doors,
    start_popauth: Any,
) -> None:
    popauth = start_popauth()
    with namespace.inside():
        # A POP check over IPv4 ...
        assert pop3_login(dovecot6.pop3_port, "alice", USERS["alice"], DUAL4, SERVER4)
    assert codes(doors.relay(DUAL4, sendmail=False)) == {250}
    # ... does not let the same machine relay over IPv6.
    assert refused(doors.relay(DUAL6))
    assert popauth.ask(f"REVOKE {DUAL4}")[0].startswith("OK ")  # start again from nothing
    with namespace.inside():
        assert pop3_login(dovecot6.pop3_port, "alice", USERS["alice"], DUAL6, SERVER6)
    assert codes(doors.relay(DUAL6)) == {250}
    assert refused(doors.relay(DUAL4, sendmail=False))
