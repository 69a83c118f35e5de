"""How the follower hands logins to the ingest socket: bounded exchanges, every reply read."""

from __future__ import annotations

import datetime
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from popauth.companions.follow.follower import (
    REPORT_BATCH,
    Counters,
    Follower,
    IngestReporter,
    LineJudge,
)
from popauth.companions.follow.formats import Login, build_format
from popauth.companions.follow.sources import LineSource
from popauth.config import FollowTrust

LOG = structlog.get_logger()


class Backlog(LineSource):
    """Every line at once on the first read, then the end."""

    def __init__(self, lines: list[bytes]) -> None:
        self._lines = lines
        self.commits = 0

    def read_lines(self) -> list[bytes]:
        lines, self._lines = self._lines, []
        return lines

    def commit(self) -> None:
        self.commits += 1

    @property
    def exhausted(self) -> bool:
        return not self._lines


class RecordingReporter(IngestReporter):
    """Acknowledges every LOGIN and records how many each exchange carried."""

    def __init__(self) -> None:
        super().__init__("/nonexistent", 1.0, LOG)
        self.exchanges: list[int] = []

    def send(self, logins: list[Login]) -> list[str]:
        self.exchanges.append(len(logins))
        return ["OK"] * len(logins)


def login_lines(count: int) -> list[bytes]:
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds")
    return [
        f"{stamp} uid=0 pid=100 courierpop3login: LOGIN, user=user{n}, "
        f"ip=[::ffff:10.0.{n // 256 % 256}.{n % 256}], port=[40000], protocol=POP3".encode()
        for n in range(count)
    ]


def judge(counters: Counters) -> LineJudge:
    return LineJudge(
        login_format=build_format("courier"),
        trust=FollowTrust.RSYSLOG,
        trusted_uids=frozenset({0}),
        max_age=60,
        not_before=0,
        log=LOG,
        counters=counters,
    )


def follower(source: LineSource, reporter: IngestReporter, counters: Counters) -> Follower:
    return Follower(
        source=source,
        judge=judge(counters),
        reporter=reporter,
        poll_interval=0.01,
        max_age=60,
        log=LOG,
        counters=counters,
    )


def test_a_backlog_goes_out_in_bounded_exchanges() -> None:
    count = REPORT_BATCH * 2 + 17
    source = Backlog(login_lines(count))
    reporter = RecordingReporter()
    counters = Counters()
    follower(source, reporter, counters).run()
    assert sum(reporter.exchanges) == count
    assert max(reporter.exchanges) <= REPORT_BATCH
    assert counters.reported == count
    assert source.commits >= 1


@pytest.fixture
def trickling_endpoint(tmp_path: Path) -> Iterator[tuple[str, list[bytes]]]:
    """An ingest stand-in that answers each LOGIN line, its replies cut in 7-byte pieces."""
    path = str(tmp_path / "ingest.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    received: list[bytes] = []

    def serve() -> None:
        connection, _ = listener.accept()
        with connection:
            buffer = b""
            while True:
                chunk = connection.recv(4096)
                if not chunk:
                    return
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                replies = b"".join(b"OK " + line.split(b" ")[1] + b"\n" for line in lines)
                received.extend(lines)
                for start in range(0, len(replies), 7):
                    connection.sendall(replies[start : start + 7])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path, received
    listener.close()
    thread.join(5)


def test_every_reply_is_read_whatever_pieces_it_comes_in(
    trickling_endpoint: tuple[str, list[bytes]],
) -> None:
    path, received = trickling_endpoint
    reporter = IngestReporter(path, 5.0, LOG)
    logins = judge(Counters()).logins(login_lines(40), _now())
    try:
        first = reporter.send(logins[:25])
        second = reporter.send(logins[25:])
    finally:
        reporter.close()
    assert first == [f"OK {login.address}" for login in logins[:25]]
    assert second == [f"OK {login.address}" for login in logins[25:]]
    assert len(received) == 40


def _now() -> float:
    return datetime.datetime.now(datetime.UTC).timestamp()
