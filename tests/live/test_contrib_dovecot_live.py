"""contrib/dovecot/95-popauth.conf, as the README installs it, in a real Dovecot.

The snippet goes into ``conf.d/`` beside a dovecot.conf that includes
``conf.d/*.conf``, as on Debian. One file serves Dovecot 2.3 (Debian 12)
and 2.4 (Debian 13): this runs it against whichever is installed. The only
change made to it is the hook's path, which on a mail host is
``/usr/local/bin/popauth-login``: here the shared copy, run through env(1)
with the test's socket (the README's way to pass another socket).
"""

from __future__ import annotations

import pwd
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.dovecot import DovecotInstance, dovecot_version, imap_login, pop3_login
from harness.popauth import PopauthServer
from harness.ports import free_port
from harness.shared_runtime import shared_runtime
from tests.live.conftest import LIVE_SETTINGS, USERS

pytestmark = pytest.mark.live

REPO = Path(__file__).resolve().parents[2]
SNIPPET = REPO / "contrib" / "dovecot" / "95-popauth.conf"
INSTALLED_HOOK = "/usr/local/bin/popauth-login"


class ContribDovecot(DovecotInstance):
    """A Dovecot whose post-login hook is configured by the contrib snippet alone."""

    def __init__(
        self,
        *,
        root: Path,
        pop3_port: int,
        imap_port: int,
        users: dict[str, str],
        hook_command: str,
    ) -> None:
        super().__init__(root=root, pop3_port=pop3_port, imap_port=imap_port, users=users)
        self.hook_command = hook_command

    def config(self) -> str:
        return super().config() + "!include conf.d/*.conf\n"

    def _write_config(self) -> None:
        super()._write_config()
        text = SNIPPET.read_text(encoding="utf-8")
        assert text.count(INSTALLED_HOOK) == 2, "the snippet names the hook once per service"
        conf_d = self.root / "conf.d"
        conf_d.mkdir(exist_ok=True)
        (conf_d / SNIPPET.name).write_text(text.replace(INSTALLED_HOOK, self.hook_command))


@pytest.fixture
def site(open_tmp: Path) -> Iterator[tuple[ContribDovecot, PopauthServer]]:
    popauth_dir = open_tmp / "popauth"
    popauth_dir.mkdir(mode=0o755)
    runtime = shared_runtime()
    hook_command = (
        f"/usr/bin/env POPAUTH={runtime.popauth} POPAUTH_SOCKET={popauth_dir / 'ingest.sock'}"
        f" {runtime.hook}"
    )
    dovecot = ContribDovecot(
        root=open_tmp / "dovecot",
        pop3_port=free_port(),
        imap_port=free_port(),
        users=USERS,
        hook_command=hook_command,
    )
    # Only the dovecot user may report logins: the hook must run as that user.
    with PopauthServer(popauth_dir, **LIVE_SETTINGS) as popauth, dovecot:
        yield dovecot, popauth


def test_pop3_and_imap_logins_reach_popauth(site: tuple[ContribDovecot, PopauthServer]) -> None:
    dovecot, popauth = site
    assert dovecot.imap_port is not None
    assert pop3_login(dovecot.pop3_port, "alice", USERS["alice"], "127.0.0.5")
    assert imap_login(dovecot.imap_port, "bob", USERS["bob"], "127.0.0.6")
    for address, user in (("127.0.0.5", "alice"), ("127.0.0.6", "bob")):
        query = popauth.cli("query", "--format", "raw", address)
        assert query.returncode == 0, query
        assert f"user={user}" in query.stdout, query.stdout
    logins = popauth.events("login")
    assert {(event["client_ip"], event["user"]) for event in logins} == {
        ("127.0.0.5", "alice"),
        ("127.0.0.6", "bob"),
    }, logins
    # Reported by the hook as the snippet's user.
    assert {event["peer_uid"] for event in logins} == {pwd.getpwnam("dovecot").pw_uid}


def test_the_snippet_is_what_dovecot_runs(site: tuple[ContribDovecot, PopauthServer]) -> None:
    """doveconf shows both hook services, as the dovecot user, for this Dovecot version."""
    dovecot, _ = site
    shown = subprocess.run(
        ["doveconf", "-n", "-c", str(dovecot.config_file)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    for service in ("pop3", "imap"):
        block = re.search(rf"^service {service}-postlogin {{\n(.*?)^}}", shown, re.M | re.S)
        assert block is not None, shown
        assert "user = dovecot" in block.group(1), block.group(1)
        assert "executable = script-login /usr/bin/env" in block.group(1), block.group(1)
    if dovecot_version() >= (2, 4):
        assert shown.startswith("# 2.4"), shown[:200]
