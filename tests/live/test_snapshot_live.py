"""The embedded whitelist survives restarts of popauth serve (snapshots)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from harness.dovecot import DovecotInstance, pop3_login
from harness.popauth import PopauthServer
from harness.postfix import PostfixInstance
from harness.smtp import REMOTE, rcpt_reply
from popauth.basics.clock import SystemClock
from popauth.doors.ingest.protocol import parse_fields
from popauth.store.base import Grant
from popauth.store.memory import MemoryStore
from popauth.store.snapshot import Snapshotter
from tests.live.conftest import USERS, PopauthFactory
from tests.support.logs import capturing_logger

pytestmark = pytest.mark.live


@pytest.fixture
def snapshot(popauth_dir: Path) -> Path:
    path = popauth_dir / "whitelist.json"
    path.unlink(missing_ok=True)
    return path


def read_snapshot(path: Path) -> list[Grant]:
    """The entries a restart would restore from ``path`` (none if it is unusable)."""
    store = MemoryStore(ttl=86400, max_entries=1000, clock=SystemClock())
    Snapshotter(store=store, path=path, clock=SystemClock(), log=capturing_logger()[0]).restore()
    return [grant for chunk in store.entry_chunks() for grant in chunk]


def listed(server: PopauthServer) -> dict[str, str]:
    """address -> expires, from LIST."""
    return {
        fields["address"]: fields["expires"] for fields in map(parse_fields, server.ask("LIST")[1:])
    }


def test_sigterm_restart_keeps_logins_and_their_expiry(
    postfix: PostfixInstance,
    dovecot: DovecotInstance,
    start_popauth: PopauthFactory,
    snapshot: Path,
) -> None:
    first = start_popauth(snapshot_path=str(snapshot), snapshot_interval=3600)
    assert pop3_login(dovecot.pop3_port, "alice", USERS["alice"], "127.0.0.2")
    before = listed(first)
    assert first.stop() == 0  # SIGTERM
    second = start_popauth(snapshot_path=str(snapshot), snapshot_interval=3600)
    assert listed(second) == before
    assert rcpt_reply(postfix.smtp_port, "127.0.0.2", REMOTE)[0] == 250
    assert rcpt_reply(postfix.smtp_port, "127.0.0.3", REMOTE)[0] == 550
    assert second.events("snapshot_restored")[0]["restored"] == 1


def test_sigkill_loses_only_what_came_after_the_last_periodic_snapshot(
    start_popauth: PopauthFactory, snapshot: Path
) -> None:
    first = start_popauth(snapshot_path=str(snapshot), snapshot_interval=2)
    first.ask("LOGIN 127.0.0.2 alice")
    deadline = time.monotonic() + 10
    while not snapshot.exists() or not read_snapshot(snapshot):
        assert time.monotonic() < deadline, "no periodic snapshot"
        time.sleep(0.05)
    first.ask("LOGIN 127.0.0.3 bob")  # most likely after the last snapshot
    first.kill()
    saved = {str(grant.address) for grant in read_snapshot(snapshot)}
    second = start_popauth(snapshot_path=str(snapshot))
    assert set(listed(second)) == saved
    assert "127.0.0.2" in saved


@pytest.mark.parametrize(
    "content",
    [b"", b'{"format": "popauth-whitelist", "version": 1, "entr', b"\x7fELF\x02\x01", b"[]"],
)
def test_unusable_snapshot_means_starting_empty(
    postfix: PostfixInstance, start_popauth: PopauthFactory, snapshot: Path, content: bytes
) -> None:
    snapshot.write_bytes(content)
    server = start_popauth(snapshot_path=str(snapshot))
    problem = server.events("snapshot_not_restored")[0]
    assert problem["level"] == "error"
    assert listed(server) == {}
    assert server.ask("LOGIN 127.0.0.2 alice")[0].startswith("OK ")
    assert rcpt_reply(postfix.smtp_port, "127.0.0.2", REMOTE)[0] == 250
    assert server.stop() == 0
    # The clean stop replaced the bad file with a good snapshot.
    assert [str(g.address) for g in read_snapshot(snapshot)] == ["127.0.0.2"]
