"""Notices arrive: through a real Postfix's sendmail, into the user's own Maildir, once.

A private Postfix delivers ``local.test`` into Maildirs with its own
``virtual`` agent (``harness/maildir.py``); every other transport discards.
popauth relays a POP-first client's message through that Postfix's milter
and mails its user a notice with the instance's ``sendmail -C``. Two
popauth hosts on one Redis, each with its Postfix and both delivering into
the same Maildirs, see the same user's POP-first relay at once: the user
is told once.
"""

from __future__ import annotations

import email
import email.policy
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from harness.maildir import delivered, maildir_postfix, prepare_mail_root, wait_for_delivery
from harness.popauth import POPAUTH, PopauthServer
from harness.ports import free_port
from harness.postfix import PostfixInstance
from harness.redis import RedisInstance
from harness.smtp import REMOTE, rcpt_reply
from tests.live.conftest import LIVE_SETTINGS

pytestmark = pytest.mark.live

CLIENT = "127.0.0.2"
RETIRE_AT = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0)
INSTRUCTIONS = "Outgoing server mx.local.test, port 587, STARTTLS, your mail password."


def notice_settings(postfix: PostfixInstance, **more: Any) -> dict[str, Any]:
    return {
        **LIVE_SETTINGS,
        # What this Postfix really sends for local.test.
        "local_mailers": ["virtual"],
        "pop_first": "warn",
        "pop_first_retire_at": RETIRE_AT.isoformat(),
        "pop_first_notices": True,
        "pop_first_notice_sendmail": ["/usr/sbin/sendmail", "-C", str(postfix.config_dir)],
        "pop_first_notice_smtp_auth_instructions": INSTRUCTIONS,
        "pop_first_notices_per_minute": 600.0,
        **more,
    }


class Site:
    """A directory with the Maildirs and one Postfix per host delivering into them."""

    def __init__(self, root: Path, hosts: int) -> None:
        root.mkdir(mode=0o755)
        self.root = root
        self.mail_root = root / "mail"
        prepare_mail_root(self.mail_root)
        self.popauth_dirs = [root / f"host-{n}" for n in range(hosts)]
        self.postfixes: list[PostfixInstance] = []
        try:
            for n, directory in enumerate(self.popauth_dirs):
                directory.mkdir(mode=0o755)
                postfix = maildir_postfix(
                    directory,
                    milter=f"unix:{directory / 'milter.sock'}",
                    mail_root=self.mail_root,
                    users=["alice", "bob"],
                    name=f"mx{n}",
                )
                postfix.start()
                self.postfixes.append(postfix)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for postfix in self.postfixes:
            postfix.stop()

    def mail_logs(self) -> str:
        return "\n".join(postfix.log_text()[-3000:] for postfix in self.postfixes)


@pytest.fixture
def single_site(live_root: Path) -> Iterator[Site]:
    site = Site(live_root / f"notices-{time.monotonic_ns()}", hosts=1)
    yield site
    site.stop()


@pytest.fixture
def two_host_site(live_root: Path) -> Iterator[Site]:
    site = Site(live_root / f"notices-{time.monotonic_ns()}", hosts=2)
    yield site
    site.stop()


@pytest.fixture(scope="module")
def redis_server(live_root: Path) -> Iterator[RedisInstance]:
    with RedisInstance(root=live_root / "redis-notices", port=free_port()) as server:
        yield server


def test_a_notice_arrives_in_the_users_maildir_through_postfix(single_site: Site) -> None:
    postfix = single_site.postfixes[0]
    directory = single_site.popauth_dirs[0]
    ledger = directory / "notices.json"
    settings = notice_settings(
        postfix, pop_first_notice_path=str(ledger), usage_path=str(directory / "usage.json")
    )
    with PopauthServer(directory, **settings) as popauth:
        assert popauth.ask(f"LOGIN {CLIENT} alice")[0].startswith("OK ")
        assert rcpt_reply(postfix.smtp_port, CLIENT, REMOTE)[0] == 250
        sent = popauth.wait_for_event("notice_sent")
        assert (sent[0]["user"], sent[0]["recipient"]) == ("alice", "alice@local.test")
        found = wait_for_delivery(single_site.mail_root, "alice")
        assert len(found) == 1, single_site.mail_logs()
        text = found[0].read_text(encoding="utf-8")
        # More messages the same week: no second notice.
        for _ in range(3):
            assert rcpt_reply(postfix.smtp_port, CLIENT, REMOTE)[0] == 250
        assert len(popauth.wait_for_event("relay_decision", count=4)) >= 4
    # Restarted, the ledger file still knows alice was told.
    with PopauthServer(directory, **settings) as popauth:
        assert popauth.ask(f"LOGIN {CLIENT} alice")[0].startswith("OK ")
        assert rcpt_reply(postfix.smtp_port, CLIENT, REMOTE)[0] == 250
        not_due = popauth.wait_for_event("notice_not_due")
        assert not_due[0]["user"] == "alice"
        assert popauth.stop() == 0
    assert len(delivered(single_site.mail_root, "alice")) == 1
    # The dry run reads the saved usage and the ledger: alice was told, bob never relayed.
    shown = subprocess.run(
        [POPAUTH, "notices", "--dry-run", "--config", str(popauth.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[0].startswith("alice: told ")
    assert shown.stdout.splitlines()[-1] == (
        "0 of 1 users who relayed by POP-first recently would be sent a notice"
    )
    print(f"--- the notice as delivered, {found[0].name} ---\n{text}")
    message = email.message_from_string(text, policy=email.policy.default)
    assert message["To"] == "alice@local.test"
    assert message["From"] == "postmaster@local.test"
    assert message["Auto-Submitted"] == "auto-generated"
    assert (
        message["Subject"] == f"POP before SMTP ends {RETIRE_AT:%Y-%m-%d}: please turn on SMTP AUTH"
    )
    assert message.get_content_type() == "text/plain"
    assert message.get_content_charset() == "utf-8"
    assert message["Message-ID"] and message["Date"]
    # Postfix took it as a local submission from the postmaster.
    assert "Return-Path: <postmaster@local.test>" in text
    body = message.get_content()
    assert "Hello alice," in body and INSTRUCTIONS in body and "(30 days" in body


def test_two_hosts_on_one_redis_tell_a_user_once(
    two_host_site: Site, redis_server: RedisInstance
) -> None:
    redis_server.flush()
    servers = [
        PopauthServer(
            directory,
            **notice_settings(postfix, store="redis", redis_url=redis_server.url),
        ).start()
        for directory, postfix in zip(
            two_host_site.popauth_dirs, two_host_site.postfixes, strict=True
        )
    ]
    try:
        assert servers[0].ask(f"LOGIN {CLIENT} bob")[0].startswith("OK ")
        replies: list[int] = []
        barrier = threading.Barrier(len(servers))

        def relay(postfix: PostfixInstance) -> None:
            barrier.wait()
            replies.append(rcpt_reply(postfix.smtp_port, CLIENT, REMOTE)[0])

        threads = [threading.Thread(target=relay, args=(p,)) for p in two_host_site.postfixes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert replies == [250, 250]
        # Each host offered bob: one sent, the other found the claim.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            outcomes = [
                (len(s.events("notice_sent")), len(s.events("notice_not_due"))) for s in servers
            ]
            if sum(sent + not_due for sent, not_due in outcomes) >= 2:
                break
            time.sleep(0.05)
        assert sorted(outcomes) == [(0, 1), (1, 0)], [s.output()[-2000:] for s in servers]
        assert len(wait_for_delivery(two_host_site.mail_root, "bob")) == 1
        # Time for a second delivery, were there one.
        time.sleep(2)
        assert len(delivered(two_host_site.mail_root, "bob")) == 1, two_host_site.mail_logs()
        assert (
            sum(
                log.count("delivered to maildir")
                for log in (p.log_text() for p in two_host_site.postfixes)
            )
            == 1
        )
        client = redis.Redis.from_url(redis_server.url)
        value = client.get("popauth:notice:bob")
        assert isinstance(value, bytes)
        sent_at, due_at = (float(part) for part in value.split())
        assert due_at - sent_at == 7 * 86_400
        assert 7 * 86_400_000 - 60_000 < client.pttl("popauth:notice:bob") <= 7 * 86_400_000
        # SIGTERM stops both cleanly, the notice workers with them.
        assert [server.stop() for server in servers] == [0, 0]
    finally:
        for server in servers:
            server.stop()
