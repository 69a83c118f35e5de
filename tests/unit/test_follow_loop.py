"""The follow loop's judge and its talk to the ingest socket, with fakes for both ends."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import cast

import pytest
import structlog
from structlog.testing import capture_logs

from popauth.companions.follow.follower import (
    Counters,
    Follower,
    FollowError,
    IngestReporter,
    JournaldPids,
    LineJudge,
)
from popauth.companions.follow.formats import Login, build_format
from popauth.companions.follow.sources import LineSource
from popauth.config import FollowTrust

NOW = 1_800_000_000.0
SOCKET = "/run/popauth/ingest.sock"


def stamp(moment: float = NOW) -> str:
    return datetime.datetime.fromtimestamp(moment, datetime.UTC).isoformat()


def judge(counters: Counters, journald: JournaldPids | None = None) -> LineJudge:
    return LineJudge(
        login_format=build_format("courier"),
        trust=FollowTrust.RSYSLOG,
        trusted_uids=frozenset({0}),
        max_age=60,
        not_before=0.0,
        log=cast(structlog.typing.FilteringBoundLogger, structlog.get_logger()),
        counters=counters,
        journald=journald or JournaldPids(Path("/nonexistent")),
    )


def test_lines_without_a_sender_uid_are_an_error_said_once() -> None:
    """rsyslog without imuxsock's trusted properties writes ``uid= pid=``: no
    login can ever count, and the operator is told so, once."""
    counters = Counters()
    lines = [
        f"{stamp()} uid= pid= courierpop3login: LOGIN, user=alice, ip=[192.0.2.7], port=[1]",
        f"{stamp()} uid= pid= courierpop3login: LOGIN, user=bob, ip=[192.0.2.8], port=[1]",
        # Postfix's chrooted daemons log through a socket rsyslog does not annotate.
        f"{stamp()} uid= pid= postfix/smtpd[77]: connect from localhost[127.0.0.1]",
    ]
    with capture_logs() as events:
        found = judge(counters).logins([line.encode() for line in lines], NOW)
    assert found == []
    (told,) = [event for event in events if event["event"] == "follow_no_sender"]
    assert told["log_level"] == "error"
    assert "SysSock.ParseTrusted" in told["fix"]
    assert counters.refused == {"no_sender": 2}


def test_other_programs_without_a_sender_uid_say_nothing() -> None:
    counters = Counters()
    line = f"{stamp()} uid= pid= postfix/smtpd[77]: connect from localhost[127.0.0.1]"
    with capture_logs() as events:
        assert judge(counters).logins([line.encode()], NOW) == []
    assert events == []


def test_annotated_lines_say_nothing_of_senders() -> None:
    counters = Counters()
    line = f"{stamp()} uid=0 pid=42 courierpop3login: LOGIN, user=alice, ip=[192.0.2.7], port=[1]"
    with capture_logs() as events:
        (login,) = judge(counters).logins([line.encode()], NOW)
    assert (str(login.address), login.user) == ("192.0.2.7", "alice")
    assert events == []


class OneBatch(LineSource):
    """One login line, then nothing; the loop stops once it has been reported."""

    def __init__(self, holder: list[Follower]) -> None:
        self.holder = holder
        self.served = False
        self.commits = 0

    def read_lines(self) -> list[bytes]:
        if self.served:
            self.holder[0].stopping.set()
            return []
        self.served = True
        line = (
            f"{stamp()} uid=0 pid=42 courierpop3login: LOGIN, user=alice, ip=[192.0.2.7], port=[1]"
        )
        return [line.encode()]

    def commit(self) -> None:
        self.commits += 1


class ScriptedReporter(IngestReporter):
    """Raises the scripted errors in turn, then acknowledges every login."""

    def __init__(self, errors: list[OSError]) -> None:
        super().__init__(SOCKET, 1.0, cast(structlog.typing.FilteringBoundLogger, None))
        self.errors = errors
        self.sent: list[Login] = []

    def ping(self) -> str:
        return "OK pong"

    def send(self, logins: list[Login]) -> list[str]:
        if self.errors:
            raise self.errors.pop(0)
        self.sent += logins
        return ["OK" for _ in logins]


def follow(reporter: IngestReporter, source: OneBatch | None = None) -> Follower:
    counters = Counters()
    holder: list[Follower] = []
    source = source or OneBatch(holder)
    holder = source.holder
    follower = Follower(
        source=source,
        judge=judge(counters),
        reporter=reporter,
        poll_interval=0.01,
        max_age=60,
        log=cast(structlog.typing.FilteringBoundLogger, structlog.get_logger()),
        counters=counters,
        clock=lambda: NOW,
    )
    holder.append(follower)
    # The retry waits are the stop event's: make them instant.
    follower.stopping.wait = lambda timeout=None: False  # type: ignore[method-assign]
    return follower


def test_a_socket_that_shuts_the_user_out_stops_the_follower_naming_it() -> None:
    reporter = ScriptedReporter([PermissionError(13, "Permission denied")] * 2)
    with capture_logs(), pytest.raises(FollowError, match=f"ingest socket {SOCKET}: Permission"):
        follow(reporter).run()
    assert reporter.sent == []


def test_one_refused_connect_is_retried() -> None:
    """Between popauth's bind and its chmod the socket refuses for a moment."""
    reporter = ScriptedReporter([PermissionError(13, "Permission denied")])
    with capture_logs() as events:
        follow(reporter).run()
    assert [str(login.address) for login in reporter.sent] == ["192.0.2.7"]
    (warned,) = [event for event in events if event["event"] == "follow_ingest_unreachable"]
    assert warned["socket"] == SOCKET


def test_a_refusing_socket_is_found_at_start_not_at_the_first_login() -> None:
    class RefusingPing(ScriptedReporter):
        def ping(self) -> str:
            raise PermissionError(13, "Permission denied")

    source = OneBatch([])
    with capture_logs(), pytest.raises(FollowError, match="ingest_socket_acl_groups"):
        follow(RefusingPing([]), source).run()
    assert not source.served


# --- journald in front: its own pid on the lines of senders that are gone ---


def fake_proc(root: Path, processes: dict[int, str]) -> Path:
    for pid, comm in processes.items():
        (root / str(pid)).mkdir()
        (root / str(pid) / "comm").write_text(f"{comm}\n")
    return root


def test_journalds_pid_is_known_by_its_name_in_proc(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, {38: "systemd-journal", 40: "logger"})
    pids = JournaldPids(proc)
    assert 38 in pids
    assert 40 not in pids
    assert 99 not in pids  # gone: not journald's
    (proc / "38" / "comm").unlink()
    assert 38 in pids  # remembered: journald's pid stays its own


def test_a_line_with_journalds_pid_is_refused_before_any_format_sees_it(tmp_path: Path) -> None:
    """journald forwards a gone sender's line with its own pid (the uid is the sender's)."""
    counters = Counters()
    proc = fake_proc(tmp_path, {38: "systemd-journal"})
    login = "courierpop3login: LOGIN, user=alice, ip=[192.0.2.7], port=[1]"
    lines = [f"{stamp()} uid=0 pid=38 {login}", f"{stamp()} uid=0 pid=41 {login}"]
    with capture_logs() as events:
        found = judge(counters, journald=JournaldPids(proc)).logins(
            [line.encode() for line in lines], NOW
        )
    assert len(found) == 1
    (refused,) = [event for event in events if event["event"] == "follow_refused"]
    assert (refused["reason"], refused["sender_uid"]) == ("journald_pid", 0)
    assert counters.refused == {"journald_pid": 1}
    assert counters.logins == 1  # the refused line never reached the format


def test_a_no_is_remembered_for_a_second(tmp_path: Path) -> None:
    now = [100.0]
    proc = fake_proc(tmp_path, {50: "courierlogger"})
    pids = JournaldPids(proc, clock=lambda: now[0])
    assert 50 not in pids
    (proc / "50" / "comm").write_text("systemd-journal\n")
    now[0] += 0.5
    assert 50 not in pids  # the same sender's next line: no second look
    now[0] += 0.6
    assert 50 in pids
