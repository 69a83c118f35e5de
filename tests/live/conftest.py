"""Private Postfix, Dovecot and popauth instances for the live tests.

Postfix and Dovecot run for the whole session; each test gets a fresh
``popauth serve`` (an empty whitelist) on the same sockets, which Postfix
reconnects to for every SMTP session.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.dovecot import DovecotInstance
from harness.leftovers import make_run_directory
from harness.popauth import PopauthServer
from harness.ports import free_port
from harness.postfix import PostfixInstance
from harness.shared_runtime import shared_runtime

REPO = Path(__file__).resolve().parents[2]
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


@pytest.fixture(scope="session")
def postfix(
    live_root: Path, popauth_dir: Path, dovecot: DovecotInstance
) -> Iterator[PostfixInstance]:
    instance = PostfixInstance(
        root=live_root / "postfix",
        smtp_port=free_port(),
        milter=f"unix:{popauth_dir / 'milter.sock'}",
        local_domain="local.test",
        sasl_path=str(dovecot.auth_socket_for_postfix),
        # Bare names such as <postmaster> get @myorigin: make that local.
        extra_main_cf={"myhostname": "mx.local.test", "myorigin": "local.test"},
    )
    instance.start()
    yield instance
    instance.stop()


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
