"""``popauth sessions``: doveadm output parsing, the RENEW batch, one cycle, the loop."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.popauth import POPAUTH, toml_value
from popauth.basics.addresses import parse_client_address
from popauth.basics.errors import ConfigError
from popauth.companions.sessions import (
    DoveadmError,
    RenewalPlan,
    Session,
    SessionRenewer,
    doveadm_command,
    list_sessions,
    parse_doveadm_who,
    renew_sessions,
)
from popauth.config import Settings, settings_from_mapping
from popauth.doors.ingest.client import IngestClient, IngestUnreachable
from popauth.telemetry.levels import LogFormat, LogLevel
from popauth.telemetry.logs import logger_writing_to
from tests.support.ingest_endpoint import Endpoint
from tests.support.units import verify_unit

SERVICES = frozenset({"imap", "pop3"})

# ``doveadm -f tab who -1`` of Dovecot 2.3.19 with three IMAP and one POP3
# connection (two of them from the same address).
DOVECOT_23 = (
    "username\tproto\tpid\tip\n"
    "alice\timap\t21277\t127.0.0.2\n"
    "alice\timap\t21275\t127.0.0.3\n"
    "alice\timap\t21273\t127.0.0.2\n"
    "alice\tpop3\t21279\t127.0.0.1\n"
)


def test_parse_dovecot_23_listing() -> None:
    listing = parse_doveadm_who(DOVECOT_23, SERVICES)
    assert listing.sessions == [
        Session("127.0.0.2", "alice"),
        Session("127.0.0.3", "alice"),
        Session("127.0.0.1", "alice"),
    ]
    assert (listing.other_services, listing.unusable) == (0, 0)


# The same listing from Dovecot 2.4.1 (Debian 13): "service" where 2.3 had
# "proto", and the local address, empty for these loopback connections.
DOVECOT_24 = (
    "username\tservice\tpid\tip\tdest_ip\n"
    "alice\timap\t22\t127.0.0.2\t\n"
    "alice\timap\t24\t127.0.0.3\t\n"
    "alice\timap\t26\t127.0.0.2\t\n"
    "alice\tpop3\t28\t127.0.0.1\t127.0.0.1\n"
)


def test_parse_dovecot_24_listing() -> None:
    assert parse_doveadm_who(DOVECOT_24, SERVICES) == parse_doveadm_who(DOVECOT_23, SERVICES)


def test_parse_an_empty_listing() -> None:
    listing = parse_doveadm_who("username\tproto\tpid\tip\n", SERVICES)
    assert listing.sessions == []


def test_parse_odd_lines() -> None:
    text = (
        "username\tproto\tpid\tip\r\n"
        "bob\timap\t1\t::ffff:192.0.2.7\r\n"  # mapped IPv6 is the IPv4 address
        "carol\timap\t2\t2001:db8::1\n"
        "dave\tlmtp\t3\t\n"  # another service (and no address)
        "erin\tsubmission\t4\t192.0.2.9\n"
        "frank\timap\t5\t\n"  # no address: a local connection
        "grace\timap\t6\tnot-an-address\n"
        "heidi\timap\t7\n"  # too few fields
        "ivan\timap\t8\t192.0.2.1\textra\n"  # too many
        "judy smith\timap\t9\t192.0.2.2\n"  # a blank: not a user the protocol accepts
        f"{'k' * 257}\timap\t10\t192.0.2.3\n"
        "mallory\x7f\timap\t11\t192.0.2.4\n"
        "\timap\t12\t192.0.2.5\n"
        "\n"
        "   \n"
        "bob\timap\t13\t192.0.2.7\n"  # the same session as the first line
        "olivia\tIMAP\t14\t192.0.2.8\n"  # service names are Dovecot's, lower case
    )
    listing = parse_doveadm_who(text, SERVICES)
    assert listing.sessions == [Session("192.0.2.7", "bob"), Session("2001:db8::1", "carol")]
    assert listing.other_services == 3
    assert listing.unusable == 8


def test_parse_finds_columns_by_title() -> None:
    # A later Dovecot with more columns, in another order, "service" for "proto".
    text = (
        "ip\tusername\tservice\tpid\tconn_guid\tdest_ip\n"
        "192.0.2.1\talice\timap\t9\tabc\t192.0.2.254\n"
    )
    assert parse_doveadm_who(text, SERVICES).sessions == [Session("192.0.2.1", "alice")]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\n\n",
        # The table format of plain "doveadm who -1": not what we asked for.
        "username                          proto pid   ip       \n"
        "alice                             imap  21277 127.0.0.2\n",
        "username\t#\tproto\t(pids)\t(ips)\nalice\t1\timap\t(1)\t(127.0.0.2)\n",
        "Error: something\n",
    ],
)
def test_unexpected_output_is_an_error(text: str) -> None:
    with pytest.raises(DoveadmError):
        parse_doveadm_who(text, SERVICES)


def test_doveadm_command() -> None:
    assert doveadm_command("doveadm", "") == ["doveadm", "-f", "tab", "who", "-1"]
    assert doveadm_command("/usr/bin/doveadm", "/etc/dovecot/dovecot.conf") == [
        "/usr/bin/doveadm",
        "-c",
        "/etc/dovecot/dovecot.conf",
        "-f",
        "tab",
        "who",
        "-1",
    ]


def fake_doveadm(directory: Path, script: str) -> Path:
    """An executable standing in for doveadm (unit tests only; live tests use the real one)."""
    path = directory / "fake-doveadm"
    path.write_text(f"#!/bin/sh\n{script}\n", encoding="utf-8")
    path.chmod(0o755)
    return path


def test_list_sessions_runs_the_command(tmp_path: Path) -> None:
    listing_file = tmp_path / "who.txt"
    listing_file.write_text(DOVECOT_23, encoding="utf-8")
    doveadm = fake_doveadm(tmp_path, f'[ "$*" = "-f tab who -1" ] && cat {listing_file}')
    listing = list_sessions(doveadm_command(str(doveadm), ""), SERVICES, timeout=5)
    assert len(listing.sessions) == 3


def test_list_sessions_failures(tmp_path: Path) -> None:
    failing = fake_doveadm(tmp_path, "echo 'Fatal: net_connect_unix(anvil) failed' >&2; exit 75")
    with pytest.raises(DoveadmError, match=r"status 75: Fatal: net_connect_unix"):
        list_sessions([str(failing)], SERVICES, timeout=5)
    with pytest.raises(DoveadmError, match="cannot run"):
        list_sessions([str(tmp_path / "missing")], SERVICES, timeout=5)
    hanging = fake_doveadm(tmp_path, "exec sleep 30")
    started = time.monotonic()
    with pytest.raises(DoveadmError, match=r"did not finish within 0\.3s"):
        list_sessions([str(hanging)], SERVICES, timeout=0.3)
    assert time.monotonic() - started < 5


@pytest.fixture
def endpoint(tmp_path: Path) -> Iterator[Endpoint]:
    server = Endpoint(tmp_path, timeout=2)
    server.server.start()
    yield server
    server.server.stop()


def test_renew_sessions_counts_every_kind_of_reply(endpoint: Endpoint) -> None:
    endpoint.ask("LOGIN 192.0.2.1 alice")
    endpoint.ask("LOGIN 192.0.2.2 bob")
    endpoint.ask("LOGIN 192.0.2.3 mallory")
    endpoint.ask("BLOCK mallory")
    endpoint.clock.advance(800)
    counts = renew_sessions(
        IngestClient(str(endpoint.path), 5),
        [
            Session("192.0.2.1", "alice"),
            Session("192.0.2.2", "alice"),  # bob's entry: left alone
            Session("192.0.2.3", "mallory"),
            Session("192.0.2.4", "alice"),  # no entry: none is made
        ],
    )
    assert (counts.renewed, counts.not_found, counts.blocked, counts.errors) == (1, 2, 1, 0)
    endpoint.clock.advance(800)
    assert endpoint.store.lookup(parse_client_address("192.0.2.1")) is not None
    assert endpoint.store.lookup(parse_client_address("192.0.2.2")) is None
    assert endpoint.store.lookup(parse_client_address("192.0.2.4")) is None


def test_a_batch_larger_than_the_window(endpoint: Endpoint) -> None:
    for n in range(600):
        endpoint.store.grant(parse_client_address(f"10.0.{n // 256}.{n % 256}"), f"u{n}")
    lines = [f"RENEW 10.0.{n // 256}.{n % 256} u{n}" for n in range(1000)]
    replies = IngestClient(str(endpoint.path), 10).request_many(lines, window=64)
    assert len(replies) == 1000
    assert all(reply.startswith("OK address=10.0.") for reply in replies[:600])
    assert all(reply.startswith("NOTFOUND address=10.") for reply in replies[600:])


def test_request_many_is_bounded_in_time(tmp_path: Path) -> None:
    path = tmp_path / "silent.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    try:
        started = time.monotonic()
        with pytest.raises(IngestUnreachable, match="0 of 3 replies"):
            IngestClient(str(path), 0.3).request_many(["RENEW 192.0.2.1 a"] * 3)
        assert time.monotonic() - started < 3
    finally:
        listener.close()


def test_request_many_reports_an_endpoint_that_hangs_up_early(tmp_path: Path) -> None:
    path = tmp_path / "busy.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()

    def answer_busy() -> None:
        connection, _ = listener.accept()
        connection.recv(4096)  # both requests: closing on unread data would reset
        connection.sendall(b"ERR internal internal error, nothing changed\n")
        connection.close()

    thread = threading.Thread(target=answer_busy)
    thread.start()
    try:
        with pytest.raises(IngestUnreachable, match="after 1 of 2 replies: ERR internal"):
            IngestClient(str(path), 2).request_many(["RENEW 192.0.2.1 a"] * 2)
    finally:
        thread.join()
        listener.close()
    with pytest.raises(IngestUnreachable, match=r"no socket at .*missing\.sock"):
        IngestClient(str(tmp_path / "missing.sock"), 1).request_many(["PING"])


def make_renewer(
    endpoint: Endpoint, doveadm: Path, interval: float = 5.0
) -> tuple[SessionRenewer, io.StringIO]:
    stream = io.StringIO()
    plan = RenewalPlan(
        ingest_socket=str(endpoint.path),
        command=tuple(doveadm_command(str(doveadm), "")),
        services=SERVICES,
        interval=interval,
    )
    return SessionRenewer(plan, logger_writing_to(stream, LogFormat.JSON, LogLevel.INFO)), stream


def logged(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_one_cycle_renews_open_sessions_and_logs_a_summary(
    endpoint: Endpoint, tmp_path: Path
) -> None:
    endpoint.ask("LOGIN 127.0.0.2 alice")
    endpoint.ask("LOGIN 127.0.0.9 alice")  # no session open any more
    listing = tmp_path / "who.txt"
    listing.write_text(DOVECOT_23 + "dave\tlmtp\t1\t\nodd line\n", encoding="utf-8")
    renewer, stream = make_renewer(endpoint, fake_doveadm(tmp_path, f"cat {listing}"))
    endpoint.clock.advance(800)
    assert renewer.cycle()
    (summary,) = logged(stream)
    assert summary["event"] == "sessions_renewed"
    assert summary["level"] == "info"
    assert (summary["sessions"], summary["renewed"], summary["not_found"]) == (3, 1, 2)
    assert (summary["other_services"], summary["unusable_lines"]) == (1, 1)
    endpoint.clock.advance(800)
    assert endpoint.ask("QUERY 127.0.0.2")[0].startswith("OK ")
    assert endpoint.ask("QUERY 127.0.0.9") == ["NOTFOUND address=127.0.0.9"]


def test_a_failed_cycle_is_logged_and_changes_nothing(endpoint: Endpoint, tmp_path: Path) -> None:
    endpoint.ask("LOGIN 127.0.0.2 alice")
    renewer, stream = make_renewer(endpoint, fake_doveadm(tmp_path, "echo oops >&2; exit 1"))
    assert not renewer.cycle()
    (event,) = logged(stream)
    assert (event["event"], event["level"]) == ("sessions_unlisted", "error")
    assert "oops" in str(event["error"])
    endpoint.server.stop()
    listing = tmp_path / "who.txt"
    listing.write_text(DOVECOT_23, encoding="utf-8")
    renewer, stream = make_renewer(endpoint, fake_doveadm(tmp_path, f"cat {listing}"))
    assert not renewer.cycle()
    (event,) = logged(stream)
    assert event["event"] == "sessions_not_renewed"
    assert str(endpoint.path) in str(event["error"])


def test_forbidden_renewals_are_an_error(tmp_path: Path) -> None:
    from popauth.doors.ingest.roles import Members, PeerPolicy

    strict = Endpoint(tmp_path, peers=PeerPolicy(Members(frozenset({4242}), frozenset({4242}))))
    strict.server.start()
    try:
        listing = tmp_path / "who.txt"
        listing.write_text(DOVECOT_23, encoding="utf-8")
        renewer, stream = make_renewer(strict, fake_doveadm(tmp_path, f"cat {listing}"))
        assert not renewer.cycle()
        (summary,) = logged(stream)
        assert (summary["level"], summary["errors"]) == ("error", 3)
        assert str(summary["first_error"]).startswith("ERR forbidden")
    finally:
        strict.server.stop()


def test_the_loop_cycles_every_interval_and_stops_promptly(
    endpoint: Endpoint, tmp_path: Path
) -> None:
    counter = tmp_path / "count"
    listing = tmp_path / "who.txt"
    listing.write_text(DOVECOT_23, encoding="utf-8")
    doveadm = fake_doveadm(tmp_path, f"echo x >> {counter}; cat {listing}")
    renewer, stream = make_renewer(endpoint, doveadm, interval=0.2)
    stop = threading.Event()
    thread = threading.Thread(target=renewer.run, args=(stop,))
    thread.start()
    deadline = time.monotonic() + 10
    while not counter.exists() or len(counter.read_text().split()) < 3:
        assert time.monotonic() < deadline, stream.getvalue()
        time.sleep(0.05)
    stop.set()
    stopped = time.monotonic()
    thread.join(5)
    assert not thread.is_alive()
    assert time.monotonic() - stopped < 1
    events = [event["event"] for event in logged(stream)]
    assert events[0] == "sessions_started"
    assert events[-1] == "sessions_stopped"
    assert events.count("sessions_renewed") >= 3


def test_the_loop_is_ready_after_its_first_cycle(endpoint: Endpoint, tmp_path: Path) -> None:
    listing = tmp_path / "who.txt"
    listing.write_text(DOVECOT_23, encoding="utf-8")
    renewer, stream = make_renewer(endpoint, fake_doveadm(tmp_path, f"cat {listing}"), 0.2)
    stop = threading.Event()
    readiness: list[int] = []

    def ready() -> None:
        readiness.append(len(logged(stream)))
        stop.set()

    renewer.run(stop, ready)
    # Told once, after sessions_started and the first cycle's summary.
    assert readiness == [2]


def test_console_log_lines() -> None:
    stream = io.StringIO()
    log = logger_writing_to(stream, LogFormat.CONSOLE, LogLevel.INFO)
    log.debug("hidden")
    log.error("sessions_unlisted", error="doveadm exited")
    (line,) = stream.getvalue().splitlines()
    assert line.endswith(' error   sessions_unlisted error="doveadm exited"')


def test_settings() -> None:
    assert Settings().session_interval() == 225
    assert settings_from_mapping({"ttl": 2}).session_interval() == 0.5
    custom = settings_from_mapping(
        {
            "ttl": 60,
            "session_renew_interval": 10,
            "session_protocols": ["imap"],
            "session_dovecot_config": "/etc/dovecot/dovecot.conf",
        }
    )
    assert (custom.session_interval(), custom.sessions.protocols) == (10, ("imap",))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"ttl": 60, "session_renew_interval": 60}, "must be less than ttl"),
        ({"session_renew_interval": 0.01}, "at least 0.1"),
        ({"session_renew_interval": -1}, "between"),
        ({"session_protocols": []}, "must not be empty"),
        ({"session_protocols": ["IMAP"]}, "not a Dovecot protocol"),
        ({"session_dovecot_config": "dovecot.conf"}, "absolute path"),
        ({"session_doveadm": ""}, "must not be empty"),
    ],
)
def test_bad_settings(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings_from_mapping(raw)


def test_the_command_line(endpoint: Endpoint, tmp_path: Path) -> None:
    endpoint.ask("LOGIN 127.0.0.2 alice")
    listing = tmp_path / "who.txt"
    listing.write_text(DOVECOT_23, encoding="utf-8")
    doveadm = fake_doveadm(tmp_path, f"cat {listing}")
    config = tmp_path / "popauth.toml"
    settings = {
        "ingest_socket": str(endpoint.path),
        "session_doveadm": str(doveadm),
        "log_format": "json",
    }
    config.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in settings.items()))
    once = subprocess.run(
        [POPAUTH, "sessions", "--config", str(config), "--once"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert once.returncode == 0, once.stderr
    assert json.loads(once.stderr)["renewed"] == 1
    config.write_text(config.read_text() + "ttl = 10\nsession_renew_interval = 10\n")
    refused = subprocess.run(
        [POPAUTH, "sessions", "--config", str(config), "--once"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert refused.returncode == 2
    assert "session_renew_interval" in refused.stderr


def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    """contrib/systemd/popauth-sessions.service, with this checkout's popauth in it.

    systemd-analyze only warns about unknown keys: any output is a failure.
    """
    unit = Path(__file__).parents[2] / "contrib" / "systemd" / "popauth-sessions.service"
    text = unit.read_text(encoding="utf-8")
    assert "ExecStart=/usr/local/bin/popauth sessions --config " in text
    assert verify_unit(unit, tmp_path) == (0, "")
