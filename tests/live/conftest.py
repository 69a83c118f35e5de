"""The live layer: real daemons, root, and the ``live`` marker.

Every test under tests/live is marked ``live`` here, so that
``pytest -m "not live"`` leaves them out and runs without root. Before the
first live test runs, the run stops with one line saying what to do when it
cannot start daemons (not root, or other users cannot run the shared copy
of popauth).

Postfix and Dovecot run for the whole session; each test gets a fresh
``popauth serve`` (an empty whitelist) on the same sockets, which Postfix
reconnects to for every SMTP session. Sendmail (on the same milter socket)
and the two multi-host MTA hosts start when a test first asks for them.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.dovecot import DovecotInstance
from harness.leftovers import make_run_directory
from harness.multihost import MtaHost, MtaHosts
from harness.popauth import PopauthServer
from harness.ports import free_port
from harness.postfix import PostfixInstance
from harness.sendmail import (
    CONTRIB_MC,
    DEFAULT_CACHE_DIR,
    SendmailInstance,
    ensure_sendmail_root,
    make_sasl_dir,
    wrap_contrib_mc,
)
from harness.shared_runtime import RuntimeUnreachable, shared_runtime
from harness.smtp import REMOTE

REPO = Path(__file__).resolve().parents[2]
LIVE = Path(__file__).resolve().parent
USERS = {"alice": "wonderland", "bob": "builder"}

# A realistic deployment: the milter socket for the postfix group, the ingest
# socket for the dovecot group, and only dovecot (the hook) may whitelist.
LIVE_SETTINGS: dict[str, Any] = {
    "milter_socket_mode": "0660",
    "milter_socket_group": "postfix",
    "ingest_socket_mode": "0660",
    "ingest_socket_group": "dovecot",
    "ingest_allowed_users": ["dovecot"],
    "local_domains": ["local.test"],
    "local_mailers": ["local"],
    "trusted_networks": [],
}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test of this directory ``live`` (before ``-m`` selects)."""
    for item in items:
        if LIVE in item.path.resolve().parents:
            item.add_marker(pytest.mark.live)


def require_live_host() -> None:
    """Stop the run, with one line saying what to do, when daemons cannot be started."""
    if os.geteuid() != 0:
        pytest.exit(
            "the live tests start private Postfix/Dovecot instances and switch users: "
            "run them as root (sudo make test), or leave them out with -m 'not live'",
            returncode=2,
        )
    try:
        shared_runtime()
    except RuntimeUnreachable as problem:
        pytest.exit(str(problem), returncode=2)


@pytest.fixture(scope="session", autouse=True)
def live_host() -> None:
    """Once, before the first live test: root, and a popauth other users can run."""
    require_live_host()


@pytest.fixture(scope="session")
def live_root() -> Iterator[Path]:
    root = make_run_directory("popauth-live-")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def popauth_dir(live_root: Path) -> Path:
    directory = live_root / "popauth"
    directory.mkdir(mode=0o755)
    return directory


@pytest.fixture(scope="session")
def dovecot(live_root: Path, popauth_dir: Path) -> Iterator[DovecotInstance]:
    sasl_dir = live_root / "sasl"
    sasl_dir.mkdir(mode=0o755)
    instance = DovecotInstance(
        root=live_root / "dovecot",
        pop3_port=free_port(),
        imap_port=free_port(),
        users=USERS,
        # Dovecot's hook user runs these: copies it can reach (see shared_runtime).
        postlogin_hook=shared_runtime().hook,
        hook_env={
            "POPAUTH": str(shared_runtime().popauth),
            "POPAUTH_SOCKET": str(popauth_dir / "ingest.sock"),
        },
        # Postfix's smtpd refuses to start without its SASL socket, so Dovecot
        # starts first and puts it outside Postfix's queue directory.
        auth_socket_for_postfix=sasl_dir / "auth",
    )
    instance.start()
    yield instance
    instance.stop()


def mx_postfix(
    root: Path,
    dovecot: DovecotInstance,
    *,
    milter: str | None = None,
    relay_restrictions: str | None = None,
) -> PostfixInstance:
    """An unstarted Postfix for local.test with Dovecot's SASL, asking popauth
    through ``milter`` or a door in its ``relay_restrictions``."""
    return PostfixInstance(
        root=root,
        smtp_port=free_port(),
        milter=milter,
        local_domain="local.test",
        sasl_path=str(dovecot.auth_socket_for_postfix),
        relay_restrictions=relay_restrictions,
        # Bare names such as <postmaster> get @myorigin: make that local.
        extra_main_cf={"myhostname": "mx.local.test", "myorigin": "local.test"},
    )


@pytest.fixture(scope="session")
def postfix(
    live_root: Path, popauth_dir: Path, dovecot: DovecotInstance
) -> Iterator[PostfixInstance]:
    with mx_postfix(
        live_root / "postfix", dovecot, milter=f"unix:{popauth_dir / 'milter.sock'}"
    ) as instance:
        yield instance


# Recipients at a local domain that route elsewhere (%-hack, bang path,
# quoted local part, source route): a door must refuse them as relays.
DISGUISED = (
    "someone%remote.example@local.test",
    "remote.example!someone@local.test",
    '"someone@remote.example"@local.test',
    "@local.test:someone@remote.example",
)


def assert_postfix_relay_denied(reply: tuple[int, str], recipient: str = REMOTE) -> None:
    """Postfix's refusal of a relay when a door (socketmap, policy) said no."""
    assert reply == (
        550,
        f"5.7.1 <{recipient}>: Recipient address rejected: Relaying denied. Turn on SMTP AUTH "
        "in your mail program, or check your mail (POP/IMAP) just before sending.",
    ), reply


def ask_by_hand(path: Path, raw: bytes, reply: Callable[[bytes], bytes | None]) -> bytes:
    """Send ``raw`` over the UNIX socket ``path``; what ``reply`` cuts from what
    arrives (None: not all of it yet)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(5)
        connection.connect(str(path))
        connection.sendall(raw)
        buffer = b""
        while (answer := reply(buffer)) is None:
            chunk = connection.recv(4096)
            assert chunk, f"{path.name}: the door closed the connection"
            buffer += chunk
        return answer


PopauthFactory = Callable[..., PopauthServer]


@pytest.fixture
def start_popauth(popauth_dir: Path) -> Iterator[PopauthFactory]:
    """Start popauth with the live settings plus overrides; stopped after the test."""
    started: list[PopauthServer] = []

    def start(**overrides: Any) -> PopauthServer:
        server = PopauthServer(popauth_dir, **{**LIVE_SETTINGS, **overrides}).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def popauth(start_popauth: PopauthFactory) -> PopauthServer:
    return start_popauth()


@pytest.fixture(scope="session")
def mta_hosts(live_root: Path) -> Iterator[MtaHosts]:
    """Two MTA hosts (Postfix each) for the tests of a store shared between hosts."""
    hosts = MtaHosts(live_root / "hosts", ("host-a", "host-b"))
    yield hosts
    hosts.stop()


@pytest.fixture
def hosts(mta_hosts: MtaHosts) -> Iterator[list[MtaHost]]:
    """The two MTA hosts; the popauth a test started on them is stopped after it."""
    yield mta_hosts.hosts
    mta_hosts.stop_popauth()


# -- Sendmail ----------------------------------------------------------------

SENDMAIL_SASL_USERS = {"carol": "s3cret"}


@pytest.fixture(scope="session")
def sendmail_root() -> Path:
    """The unpacked Sendmail packages (downloaded once into the cache)."""
    tools = ("apt-get", "dpkg", "m4", "unshare", "saslpasswd2")
    missing = [tool for tool in tools if not shutil.which(tool)]
    assert not missing, f"missing tools {missing}: run scripts/bootstrap test"
    return ensure_sendmail_root(DEFAULT_CACHE_DIR)


def start_sendmail(
    root: Path,
    workdir: Path,
    popauth_dir: Path,
    *,
    extra: str = "",
    sasl_dir: Path | None = None,
) -> SendmailInstance:
    """A Sendmail from contrib/sendmail.mc, its milter popauth's socket in ``popauth_dir``."""
    port = free_port()
    mc = wrap_contrib_mc(
        CONTRIB_MC.read_text(),
        workdir,
        port,
        milter_socket=f"unix:{popauth_dir / 'milter.sock'}",
        local_domains="local.test",
        extra=extra,
    )
    return SendmailInstance(root, workdir, port, mc, sasl_dir=sasl_dir).start()


@pytest.fixture(scope="session")
def sendmail(sendmail_root: Path, live_root: Path, popauth_dir: Path) -> Iterator[SendmailInstance]:
    """The main instance: contrib .mc as is, with SMTP AUTH (sasldb)."""
    sasl_dir = make_sasl_dir(
        live_root / "sendmail-sasl", SENDMAIL_SASL_USERS, realm="mx.local.test"
    )
    instance = start_sendmail(sendmail_root, live_root / "sendmail", popauth_dir, sasl_dir=sasl_dir)
    yield instance
    instance.stop()
