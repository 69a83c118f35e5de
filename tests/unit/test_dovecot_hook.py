"""The contrib Dovecot hook, run as Dovecot runs it: environment in, exec out."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.ingest_endpoint import Endpoint
from tests.support.scripted import scripted_endpoint

HOOK = Path(__file__).resolve().parents[2] / "contrib" / "dovecot" / "popauth-login"


def run_hook(socket_path: Path, **environment: str) -> subprocess.CompletedProcess[str]:
    # script-login passes the mail process as arguments; echo stands in for it.
    return subprocess.run(
        [str(HOOK), "/bin/echo", "mail process started"],
        env={"IP": "192.0.2.1", "USER": "alice", "POPAUTH_SOCKET": str(socket_path), **environment},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_reports_the_login_then_becomes_the_mail_process(endpoint: Endpoint) -> None:
    completed = run_hook(endpoint.path)
    assert completed.returncode == 0
    assert completed.stdout == "mail process started\n"
    assert completed.stderr == ""
    assert endpoint.ask("QUERY 192.0.2.1")[0].startswith("OK address=192.0.2.1 user=alice")


def test_gives_up_after_popauth_timeout_and_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "wedged.sock"
    wedged = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    wedged.bind(str(path))
    wedged.listen(4)  # accepts connections, never answers
    try:
        started = time.monotonic()
        completed = run_hook(path, POPAUTH_TIMEOUT="0.3")
        elapsed = time.monotonic() - started
    finally:
        wedged.close()
    assert completed.stdout == "mail process started\n"
    assert "could not record login of alice from 192.0.2.1" in completed.stderr
    assert elapsed < 2.0, elapsed  # 0.3 s, not the default 2 s


def test_refusal_is_reported_and_the_login_goes_on(endpoint: Endpoint) -> None:
    completed = run_hook(endpoint.path, IP="not-an-address")
    assert completed.stdout == "mail process started\n"
    assert "ERR address" in completed.stderr
    assert endpoint.store.stats().grants == 0


def assert_mail_process_ran(completed: subprocess.CompletedProcess[str]) -> None:
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == "mail process started\n"


@pytest.mark.parametrize("timeout", ["2s", "", "-1", "nan", "1e9"])
def test_malformed_timeout_is_reported_and_the_default_used(
    endpoint: Endpoint, timeout: str
) -> None:
    completed = run_hook(endpoint.path, POPAUTH_TIMEOUT=timeout)
    assert_mail_process_ran(completed)
    assert f"POPAUTH_TIMEOUT={timeout!r} is not a number of seconds" in completed.stderr
    # The login is still reported, within the default deadline.
    assert endpoint.ask("QUERY 192.0.2.1")[0].startswith("OK address=192.0.2.1 user=alice")


def test_no_ip_is_reported_and_nothing_sent(endpoint: Endpoint) -> None:
    completed = run_hook(endpoint.path, IP="")
    assert_mail_process_ran(completed)
    assert "no IP in the environment" in completed.stderr
    assert endpoint.store.stats().grants == 0


@pytest.mark.parametrize(
    ("address", "user"),
    [
        ("192.0.2.1", "alice\nLOGIN 198.51.100.66 mallory"),
        ("192.0.2.1", "alice\r\nLOGIN 198.51.100.66 mallory"),
        ("192.0.2.1", "al\x1b[31mice"),
        ("192.0.2.1", "alice\x7f"),
        ("192.0.2.1\nLOGIN 198.51.100.66 mallory", "alice"),
        ("192.0.2.1\t", "alice"),
    ],
)
def test_control_characters_are_never_sent(endpoint: Endpoint, address: str, user: str) -> None:
    completed = run_hook(endpoint.path, IP=address, USER=user)
    assert_mail_process_ran(completed)
    assert "control characters" in completed.stderr
    assert endpoint.store.stats().grants == 0
    assert endpoint.ask("QUERY 198.51.100.66") == ["NOTFOUND address=198.51.100.66"]


def test_missing_socket_is_named(tmp_path: Path) -> None:
    absent = tmp_path / "absent.sock"
    completed = run_hook(absent)
    assert_mail_process_ran(completed)
    assert f"no socket at {absent}" in completed.stderr
    assert "FileNotFoundError" not in completed.stderr


def test_a_socket_that_never_answers_is_named(tmp_path: Path) -> None:
    path = tmp_path / "silent.sock"
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(str(path))
    silent.listen(4)
    try:
        completed = run_hook(path, POPAUTH_TIMEOUT="0.3")
    finally:
        silent.close()
    assert_mail_process_ran(completed)
    assert f"no answer from {path} within 0.3s" in completed.stderr


def test_busy_endpoint_is_retried_once(tmp_path: Path) -> None:
    path = tmp_path / "busy.sock"
    connections = scripted_endpoint(
        path, [b"ERR busy too many clients\n", b"OK address=192.0.2.1 user=alice\n"]
    )
    completed = run_hook(path)
    assert_mail_process_ran(completed)
    assert completed.stderr == ""
    assert connections() == 2


def test_refused_connection_is_retried_once_then_reported(tmp_path: Path) -> None:
    path = tmp_path / "refusing.sock"
    bound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound.bind(str(path))  # nobody listens: ECONNREFUSED
    try:
        started = time.monotonic()
        completed = run_hook(path)
        elapsed = time.monotonic() - started
    finally:
        bound.close()
    assert_mail_process_ran(completed)
    assert f"cannot reach {path}: Connection refused" in completed.stderr
    assert elapsed < 2.0


def test_unreadable_environment_still_execs(tmp_path: Path) -> None:
    # No POPAUTH_SOCKET at all, USER absent: the default socket, and the login goes on.
    completed = subprocess.run(
        [str(HOOK), "/bin/echo", "mail process started"],
        env={"IP": "192.0.2.1"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert_mail_process_ran(completed)
    assert "/run/popauth/ingest.sock" in completed.stderr or completed.stderr == ""
