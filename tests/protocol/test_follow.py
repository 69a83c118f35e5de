"""``popauth follow`` against a real ``popauth serve``: the same path as a hook's LOGIN.

The log lines are written by the test in the rsyslog template's form (the
live tests have real servers and a real rsyslog write them); each negative
case is followed by a sentinel login, and the test waits for the sentinel:
the follower handles lines in order, so what came before it was judged.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.popauth import FollowerProcess, PopauthProcessError, PopauthServer, wait_until
from popauth.companions.follow.sources import MAX_LINE


def stamp(offset: float = 0.0) -> str:
    moment = datetime.datetime.fromtimestamp(time.time() + offset, datetime.UTC)
    return moment.isoformat(timespec="microseconds")


def login_line(user: str, ip: str, uid: int = 0, pid: int = 4000, offset: float = 0.0) -> str:
    """solid-pop3d's login line (a root process logs it), in the rsyslog template."""
    envelope = f"{stamp(offset)} uid={uid} pid={pid} solid-pop3d[{pid}]"
    return f"{envelope}: user {user} authenticated - {ip}\n"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PopauthServer]:
    with PopauthServer(tmp_path, ipv6_prefix=64) as running:
        yield running


@pytest.fixture
def log(tmp_path: Path) -> Path:
    path = tmp_path / "logins.log"
    path.write_text("")
    return path


def write(path: Path, *lines: str) -> None:
    with path.open("a") as handle:
        handle.write("".join(lines))


def whitelisted(server: PopauthServer, address: str) -> bool:
    return server.ask(f"QUERY {address}")[0].startswith("OK")


def wait_whitelisted(server: PopauthServer, address: str, follower: FollowerProcess) -> None:
    wait_until(
        lambda: whitelisted(server, address),
        10,
        lambda: f"{address} not whitelisted; follower said:\n{follower.output()}",
    )


def test_logins_take_the_ingest_path(tmp_path: Path, server: PopauthServer, log: Path) -> None:
    follower = FollowerProcess(tmp_path, server, str(log), follow_format="solid-pop3d").start()
    try:
        server.ask("BLOCK mallory")
        write(
            log,
            login_line("mallory", "192.0.2.66"),  # blocked: refused by the ingest endpoint
            "Nov 23 09:41:23 mx solid-pop3d[1]: user plain authenticated - 192.0.2.67\n",
            login_line("failed", "192.0.2.68").replace(
                "user failed", "authentication failed for user failed"
            ),
            login_line("sneaky", "192.0.2.69", uid=65534),  # a local user's logger line
            login_line("old", "192.0.2.70", offset=-120),  # older than follow_max_age
            login_line("alice", "192.0.2.7"),
        )
        wait_whitelisted(server, "192.0.2.7", follower)
        for refused in ("192.0.2.66", "192.0.2.67", "192.0.2.68", "192.0.2.69", "192.0.2.70"):
            assert not whitelisted(server, refused), refused
        reasons = {event["reason"] for event in follower.events("follow_refused")}
        assert reasons == {"untrusted_sender", "stale"}
        assert follower.events("follow_login_refused")[0]["user"] == "mallory"
        # ipv6_prefix applies: the whole /64 of an IPv6 login.
        write(log, login_line("bob", "2001:db8:1:2::9", pid=4001))
        wait_whitelisted(server, "2001:db8:1:2::1234", follower)
        # The usage books and the whitelist name the user, as for a hook's login.
        entry = server.ask("QUERY 192.0.2.7")[0]
        assert "user=alice" in entry
    finally:
        assert follower.stop() == 0


def test_a_restart_replays_nothing(tmp_path: Path, server: PopauthServer, log: Path) -> None:
    follower = FollowerProcess(tmp_path, server, str(log), follow_format="solid-pop3d").start()
    write(log, login_line("alice", "192.0.2.7"))
    wait_whitelisted(server, "192.0.2.7", follower)
    assert follower.stop() == 0
    server.ask("REVOKE 192.0.2.7")
    write(log, login_line("bob", "192.0.2.8"))  # logged while the follower is stopped
    restarted = FollowerProcess(tmp_path, server, str(log), follow_format="solid-pop3d").start()
    try:
        wait_whitelisted(server, "192.0.2.8", restarted)
        assert not whitelisted(server, "192.0.2.7")
        assert len(restarted.events("follow_login")) == 2  # bob's, and alice's of the first run
    finally:
        assert restarted.stop() == 0


def test_standard_input_refuses_lines_from_before_its_start(
    tmp_path: Path, server: PopauthServer
) -> None:
    read_end, write_end = os.pipe()
    # What tail -F prints first: lines logged before the follower started.
    os.write(write_end, login_line("early", "192.0.2.9", offset=-3).encode())
    follower = FollowerProcess(tmp_path, server, "-", follow_format="solid-pop3d")
    follower.start(stdin=read_end)
    os.close(read_end)
    try:
        os.write(write_end, login_line("alice", "192.0.2.7", offset=1).encode())
        wait_whitelisted(server, "192.0.2.7", follower)
        assert not whitelisted(server, "192.0.2.9")
    finally:
        os.close(write_end)
        assert follower.process is not None
        assert follower.process.wait(10) == 0


def test_a_group_writable_trusted_file_is_refused(tmp_path: Path, server: PopauthServer) -> None:
    log = tmp_path / "dovecot.log"
    log.write_text("")
    log.chmod(0o664)
    follower = FollowerProcess(
        tmp_path, server, str(log), follow_format="dovecot", follow_trust="file"
    )
    follower.config_path.write_text("")
    with pytest.raises(PopauthProcessError, match="writable by its group"):
        follower.start()
    assert follower.process is not None and follower.process.wait(10) == 2


def test_courier_is_refused_where_a_mail_user_can_forge_its_line(
    tmp_path: Path, server: PopauthServer, log: Path
) -> None:
    """Courier's LOGIN line comes from the logged-in user's own process: the
    follower does not start, and says why and what to use instead."""
    follower = FollowerProcess(tmp_path, server, str(log), follow_format="courier")
    with pytest.raises(PopauthProcessError, match="popauth follow exited"):
        follower.start()
    assert follower.process is not None and follower.process.wait(10) == 2
    said = follower.output()
    assert "cannot follow: courier's LOGIN line is written by a process of the logged-in" in said
    assert "Maildir/loginexec" in said
    assert "contrib/courier/popauth-courier-login" in said


def test_the_rest_of_an_over_long_line_is_not_judged(
    tmp_path: Path, server: PopauthServer, log: Path
) -> None:
    """A line cut at MAX_LINE is dropped up to its line break: what follows
    the cut, a trusted-looking envelope included, is not a line."""
    follower = FollowerProcess(tmp_path, server, str(log), follow_format="solid-pop3d").start()
    try:
        with log.open("ab") as handle:
            handle.write(b"x" * (MAX_LINE + 1))
        follower.wait_for_event("follow_line_dropped")
        write(log, login_line("mallory", "192.0.2.66"), login_line("alice", "192.0.2.7"))
        wait_whitelisted(server, "192.0.2.7", follower)
        assert not whitelisted(server, "192.0.2.66")
        (dropped,) = follower.events("follow_line_dropped")
        assert dropped["reason"] == "too_long"
    finally:
        assert follower.stop() == 0


def test_lines_without_a_sender_are_an_error_said_once(
    tmp_path: Path, server: PopauthServer, log: Path
) -> None:
    follower = FollowerProcess(tmp_path, server, str(log), follow_format="solid-pop3d").start()
    try:
        unannotated = login_line("alice", "192.0.2.9").replace("uid=0 pid=4000", "uid= pid=")
        write(log, unannotated, unannotated, login_line("alice", "192.0.2.7"))
        wait_whitelisted(server, "192.0.2.7", follower)
        assert not whitelisted(server, "192.0.2.9")
        (told,) = follower.events("follow_no_sender")
        assert told["level"] == "error"
    finally:
        assert follower.stop() == 0
