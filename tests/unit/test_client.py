"""The hook client gives up in time and reports why, whatever the endpoint does."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from pathlib import Path

import pytest

from popauth.basics.addresses import parse_client_address
from popauth.cli import EXIT_ERROR, EXIT_NOT_FOUND, EXIT_OK, main
from popauth.doors.ingest.client import IngestClient, IngestUnreachable
from popauth.relay.recipients import Recipient
from popauth.store.accounts import RelayWay
from tests.support.ingest_endpoint import Endpoint
from tests.support.scripted import scripted_endpoint


def test_missing_socket(tmp_path: Path) -> None:
    absent = tmp_path / "absent.sock"
    with pytest.raises(IngestUnreachable, match=f"no socket at {absent}"):
        IngestClient(str(absent), timeout=1).request("PING")


def test_stuck_endpoint_is_abandoned_within_the_deadline(tmp_path: Path) -> None:
    path = tmp_path / "stuck.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    accepted: list[socket.socket] = []
    # Accept and then say nothing, like a wedged server.
    thread = threading.Thread(target=lambda: accepted.append(listener.accept()[0]))
    thread.start()
    started = time.monotonic()
    with pytest.raises(IngestUnreachable, match="no answer"):
        IngestClient(str(path), timeout=0.5).request("LOGIN 192.0.2.1 alice")
    assert time.monotonic() - started < 2.0
    thread.join()
    for connection in accepted:
        connection.close()
    listener.close()


def test_endpoint_closing_mid_reply(tmp_path: Path) -> None:
    path = tmp_path / "rude.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def half_answer() -> None:
        connection, _ = listener.accept()
        connection.recv(100)
        connection.sendall(b"OK addr")
        connection.close()

    thread = threading.Thread(target=half_answer)
    thread.start()
    with pytest.raises(IngestUnreachable, match="mid-reply"):
        IngestClient(str(path), timeout=2).request("PING")
    thread.join()
    listener.close()


def test_cli_exit_codes(endpoint: Endpoint, capsys: pytest.CaptureFixture[str]) -> None:
    sock = str(endpoint.path)
    assert main(["login", "--socket", sock, "192.0.2.1", "alice"]) == EXIT_OK
    assert "user=alice" in capsys.readouterr().out
    assert main(["query", "--socket", sock, "192.0.2.1"]) == EXIT_OK
    assert main(["list", "--socket", sock]) == EXIT_OK
    # Dates as report prints them; the protocol's lines with --format raw.
    shown = capsys.readouterr().out.splitlines()
    # query: the entry with all its users; list: a row per user.
    assert shown[0].split() == ["address", "user", "granted", "expires", "users"]
    assert shown[1].split()[:2] == ["192.0.2.1", "alice"]
    assert shown[1].split()[-1] == "alice"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", " ".join(shown[1].split()[2:4]))
    assert shown[2].split() == ["address", "user", "granted", "expires"]
    assert shown[3].split() == shown[1].split()[:-1]
    assert main(["login", "--socket", sock, "192.0.2.1", "bob"]) == EXIT_OK
    capsys.readouterr()
    assert main(["query", "--socket", sock, "192.0.2.1", "--format", "raw"]) == EXIT_OK
    assert "user=bob" in (queried := capsys.readouterr().out)
    assert "users=alice,bob" in queried
    assert main(["list", "--socket", sock]) == EXIT_OK
    listed = capsys.readouterr().out.splitlines()
    assert [row.split()[:2] for row in listed[1:]] == [["192.0.2.1", "alice"], ["192.0.2.1", "bob"]]
    assert main(["revoke", "--socket", sock, "--user", "bob"]) == EXIT_OK
    capsys.readouterr()
    assert main(["list", "--socket", sock, "--format", "raw"]) == EXIT_OK
    raw = capsys.readouterr().out
    assert "count=1" in raw
    assert re.search(r"granted=\d+ expires=\d+", raw)
    assert main(["revoke", "--socket", sock, "192.0.2.1"]) == EXIT_OK
    assert main(["query", "--socket", sock, "192.0.2.1"]) == EXIT_NOT_FOUND
    assert main(["login", "--socket", sock, "not-an-ip"]) == EXIT_ERROR
    assert "ERR address" in capsys.readouterr().err
    assert main(["stats", "--socket", sock]) == EXIT_OK
    assert main(["ping", "--socket", sock]) == EXIT_OK


def test_cli_refuses_line_breaks_in_arguments(endpoint: Endpoint) -> None:
    sock = str(endpoint.path)
    assert main(["login", "--socket", sock, "192.0.2.1", "alice\nREVOKE 192.0.2.9"]) == EXIT_ERROR
    assert endpoint.store.stats().grants == 0


def test_check_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.toml"
    good.write_text('ttl = 60\nlocal_domains = ["example.org"]\nlocal_mailers = ["lmtp"]\n')
    assert main(["check-config", str(good)]) == EXIT_OK
    shown = capsys.readouterr().out
    assert "  lmtp" in shown
    assert "configured: local_mailers" in shown
    assert "example.org" in shown
    # Neither set nor learnable (no Postfix, no Sendmail here): refused, keys named.
    unlearnable = tmp_path / "unlearnable.toml"
    unlearnable.write_text(
        f'postfix_config_directory = "{tmp_path}/no-postfix"\nlearn_from_mta = "postfix"\n'
    )
    assert main(["check-config", str(unlearnable)]) == EXIT_ERROR
    error = capsys.readouterr().err
    assert "cannot learn local delivery" in error
    assert "local_domains" in error
    (tmp_path / "no-postfix").mkdir()
    (tmp_path / "no-postfix" / "main.cf").write_text("mydestination = learned.test\n")
    assert main(["check-config", str(unlearnable)]) == EXIT_OK
    assert "learned.test             postfix mydestination" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text("ttl = 60\nbogus = 1\n")
    assert main(["check-config", str(bad)]) == EXIT_ERROR
    assert "'bogus'" in capsys.readouterr().err
    # --config as every other command takes it; --quiet says nothing when good.
    assert main(["check-config", "--config", str(bad)]) == EXIT_ERROR
    assert main(["check-config", "--quiet", "--config", str(good)]) == EXIT_OK
    assert capsys.readouterr().out == ""
    assert main(["check-config", "--config", str(good), str(bad)]) == EXIT_ERROR
    assert "two settings files" in capsys.readouterr().err


def test_the_default_settings_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from popauth import cli

    default = tmp_path / "popauth.toml"
    monkeypatch.setattr(cli, "DEFAULT_CONFIG", default)
    # Absent: the embedded defaults.
    for command in (["serve"], ["check-config"], ["sessions"], ["follow"], ["list"]):
        assert cli.settings_file(cli._parser().parse_args(command)) is None
    default.write_text('local_domains = ["example.org"]\nlocal_mailers = ["local"]\nttl = 77\n')
    assert main(["check-config"]) == EXIT_OK
    assert capsys.readouterr().out.startswith(f"{default}: OK")
    # A client command finds the socket in it.
    default.write_text(f'ingest_socket = "{tmp_path}/elsewhere.sock"\n')
    assert main(["ping"]) == EXIT_ERROR
    assert "elsewhere.sock" in capsys.readouterr().err


def test_cli_block_and_report(endpoint: Endpoint, capsys: pytest.CaptureFixture[str]) -> None:
    sock = str(endpoint.path)
    endpoint.ledger.record("alice", RelayWay.POP_FIRST, messages=2, recipients=3)
    assert main(["report", "--socket", sock]) == EXIT_OK
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["user", "pop_messages", "pop_recipients"]
    assert table[1].split()[:3] == ["alice", "2", "3"]
    assert main(["report", "--socket", sock, "--format", "json"]) == EXIT_OK
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["user"] == "alice"
    assert rows[0]["pop_messages"] == "2"
    assert main(["report", "--socket", sock, "--format", "csv"]) == EXIT_OK
    assert capsys.readouterr().out.splitlines()[1].startswith("alice,2,3,")
    assert main(["login", "--socket", sock, "192.0.2.1", "alice"]) == EXIT_OK
    assert main(["block", "--socket", sock, "alice"]) == EXIT_OK
    assert main(["blocked", "--socket", sock]) == EXIT_OK
    assert "user=alice" in capsys.readouterr().out
    assert main(["login", "--socket", sock, "192.0.2.1", "alice"]) == EXIT_ERROR
    assert main(["unblock", "--socket", sock, "alice"]) == EXIT_OK
    assert main(["login", "--socket", sock, "192.0.2.2", "alice"]) == EXIT_OK
    assert main(["revoke", "--socket", sock, "--user", "alice"]) == EXIT_OK
    assert "revoked=1" in capsys.readouterr().out


def test_cli_login_refuses_control_characters(endpoint: Endpoint) -> None:
    sock = str(endpoint.path)
    assert main(["login", "--socket", sock, "192.0.2.1\x1b", "alice"]) == EXIT_ERROR
    assert main(["login", "--socket", sock, "192.0.2.1", "al\x07ice"]) == EXIT_ERROR
    assert endpoint.store.stats().grants == 0


def test_a_busy_endpoint_is_retried_once(tmp_path: Path) -> None:
    path = tmp_path / "busy.sock"
    answers = [b"ERR busy too many clients\n", b"OK pong\n"]
    connections = scripted_endpoint(path, answers)
    assert IngestClient(str(path), timeout=2).request("PING") == ["OK pong"]
    assert connections() == 2


def test_a_refused_connection_is_retried_once_then_reported(tmp_path: Path) -> None:
    path = tmp_path / "refusing.sock"
    bound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound.bind(str(path))  # a socket file nobody listens on: ECONNREFUSED
    try:
        started = time.monotonic()
        with pytest.raises(IngestUnreachable, match=f"cannot talk to {path}: Connection refused"):
            IngestClient(str(path), timeout=2).request("PING")
        assert 0.1 <= time.monotonic() - started < 2.0  # one retry, within the budget
    finally:
        bound.close()


def test_cli_explain_prints_the_explanation_only(
    endpoint: Endpoint, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = str(endpoint.path)
    assert main(["login", "--socket", sock, "192.0.2.1", "alice"]) == EXIT_OK
    capsys.readouterr()
    arguments = ["explain", "--socket", sock, "192.0.2.1", "bob@remote.test"]
    assert main([*arguments, "--user", "alice", "--sender", "<>"]) == EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "verdict: accept (whitelisted), at RCPT TO, for this recipient"
    assert not any(line.startswith("OK") for line in lines)
    assert (
        "sender: the null sender belongs to none of the entry's users (alice): relayed,"
        " and logged as sender_not_owned (pop_first_sender = 'warn')"
    ) in lines
    # A refusal is an explanation too: exit 0, whatever the verdict.
    assert main(["explain", "--socket", sock, "192.0.2.2", "bob@remote.test"]) == EXIT_OK
    assert capsys.readouterr().out.startswith("verdict: reject (relay_denied)")


def test_cli_explain_refuses_blanks_and_bad_options(
    endpoint: Endpoint, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = str(endpoint.path)
    base = ["explain", "--socket", sock, "192.0.2.1", "bob@remote.test"]
    assert main([*base, "--user", "a b"]) == EXIT_ERROR
    assert "blanks" in capsys.readouterr().err
    assert main([*base, "--mailer", "no/such"]) == EXIT_ERROR
    assert "ERR syntax a mailer is" in capsys.readouterr().err


def test_query_shows_the_relay_budget_left(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    endpoint = Endpoint(tmp_path, budgets=True)
    endpoint.server.start()
    try:
        sock = str(endpoint.path)
        assert endpoint.ask("LOGIN 192.0.2.1 alice")[0].startswith("OK ")
        (line,) = endpoint.ask("QUERY 192.0.2.1")
        # After the entry's fields, which older clients read as before.
        assert line.startswith("OK address=192.0.2.1 user=alice granted=")
        assert line.endswith(" users=alice budget_left=1000 budget_max=1000 budget_ends=0")
        address = parse_client_address("192.0.2.1")
        _, message = endpoint.gate.message(address, "")
        for _ in range(3):
            endpoint.gate.recipient(message, Recipient("<x@remote.example>", "smtp", None))
        (line,) = endpoint.ask("QUERY 192.0.2.1")
        ends = int(line.rsplit("budget_ends=", 1)[1])
        assert " budget_left=997 budget_max=1000 " in line
        assert ends == int(endpoint.clock.time() + 3600)
        assert main(["query", "--socket", sock, "192.0.2.1"]) == EXIT_OK
        header, row = capsys.readouterr().out.splitlines()
        assert header.split() == [
            *("address", "user", "granted", "expires", "users", "budget_left", "budget_ends")
        ]
        assert row.split()[-3:-1] == ["997/1000", time.strftime("%Y-%m-%d", time.gmtime(ends))]
    finally:
        endpoint.server.stop()
