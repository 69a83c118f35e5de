"""The contrib Courier reporter, run as pam_exec runs it: PAM variables in, one LOGIN out."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.support.ingest_endpoint import Endpoint

REPORTER = Path(__file__).resolve().parents[2] / "contrib" / "courier" / "popauth-courier-login"
ACCOUNT = {"PAM_TYPE": "account", "PAM_SERVICE": "pop3", "PAM_USER": "alice"}


def load_reporter() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("popauth_courier_login", str(REPORTER))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


@pytest.fixture
def authdaemon(tmp_path: Path) -> Iterator[Path]:
    """A socket in a directory closed to others, as Debian makes /run/courier/authdaemon."""
    directory = tmp_path / "authdaemon"
    directory.mkdir(mode=0o750)
    path = directory / "socket"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bound:
        bound.bind(str(path))
        path.chmod(0o777)  # authdaemond's own mode: the directory is the gate
        yield path


def run_reporter(
    socket_path: Path, authdaemon: Path, *extra: str, **environment: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(REPORTER), f"socket={socket_path}", f"authdaemon={authdaemon}", *extra],
        env={**ACCOUNT, "PAM_RHOST": "::ffff:192.0.2.1", **environment},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_reports_the_account_stacks_user_and_client_address(
    endpoint: Endpoint, authdaemon: Path
) -> None:
    completed = run_reporter(endpoint.path, authdaemon)
    assert (completed.returncode, completed.stderr) == (0, "")
    assert endpoint.ask("QUERY 192.0.2.1")[0].startswith("OK address=192.0.2.1 user=alice")


@pytest.mark.parametrize("kind", ["auth", "open_session", ""])
def test_only_the_account_stack_counts(endpoint: Endpoint, authdaemon: Path, kind: str) -> None:
    """The auth stack runs before the password is checked: a line there proves nothing."""
    completed = run_reporter(endpoint.path, authdaemon, PAM_TYPE=kind)
    assert completed.returncode == 0
    assert "only the account stack follows a checked password" in completed.stderr
    assert endpoint.store.stats().grants == 0


def test_a_pam_variable_defined_twice_is_not_guessed(endpoint: Endpoint, authdaemon: Path) -> None:
    reporter = load_reporter()
    doubled = b"PAM_TYPE=account\0PAM_USER=alice\0PAM_RHOST=203.0.113.9\0PAM_RHOST=192.0.2.1\0"
    with pytest.raises(reporter.ReportError, match="PAM_RHOST is defined twice"):
        reporter.record([f"socket={endpoint.path}", f"authdaemon={authdaemon}"], doubled)
    assert endpoint.store.stats().grants == 0


def test_an_authdaemon_socket_every_user_reaches_is_refused(endpoint: Endpoint) -> None:
    """Whoever reaches authdaemond sends it their own password and any TCPREMOTEIP."""
    directory = Path(tempfile.mkdtemp(prefix="popauth-authdaemon-", dir="/tmp"))
    try:
        directory.chmod(0o755)
        path = directory / "socket"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bound:
            bound.bind(str(path))
            path.chmod(0o777)
            completed = run_reporter(endpoint.path, path)
    finally:
        shutil.rmtree(directory)
    assert completed.returncode == 0
    assert f"every local user can reach authdaemond's socket {path}" in completed.stderr
    assert endpoint.store.stats().grants == 0


def test_a_missing_authdaemon_socket_is_named(endpoint: Endpoint, tmp_path: Path) -> None:
    completed = run_reporter(endpoint.path, tmp_path / "nowhere")
    assert completed.returncode == 0
    assert f"cannot check authdaemond's socket {tmp_path / 'nowhere'}" in completed.stderr
    assert endpoint.store.stats().grants == 0


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (("timeout=2s",), "timeout='2s' is not a number of seconds"),
        (("timeout=0",), "timeout='0' is not a number of seconds"),
        (("sockets=/x",), "bad argument 'sockets=/x'"),
        (("socket",), "bad argument 'socket'"),
    ],
)
def test_bad_arguments_are_named_and_the_login_goes_on(
    endpoint: Endpoint, authdaemon: Path, extra: tuple[str, ...], said: str
) -> None:
    completed = run_reporter(endpoint.path, authdaemon, *extra)
    assert completed.returncode == 0
    assert said in completed.stderr


@pytest.mark.parametrize(
    ("address", "user"),
    [
        ("", "alice"),
        ("192.0.2.1", ""),
        ("192.0.2.1\nLOGIN 198.51.100.66 mallory", "alice"),
        ("192.0.2.1", "alice\nLOGIN 198.51.100.66 mallory"),
        ("192.0.2.1", "alice 198.51.100.66"),
    ],
)
def test_odd_variables_are_never_sent(
    endpoint: Endpoint, authdaemon: Path, address: str, user: str
) -> None:
    completed = run_reporter(endpoint.path, authdaemon, PAM_RHOST=address, PAM_USER=user)
    assert completed.returncode == 0
    assert "not reported" in completed.stderr or "refusing to report" in completed.stderr
    assert endpoint.store.stats().grants == 0


def test_a_refusal_and_a_silent_socket_are_named(
    endpoint: Endpoint, authdaemon: Path, tmp_path: Path
) -> None:
    completed = run_reporter(endpoint.path, authdaemon, PAM_RHOST="not-an-address")
    assert completed.returncode == 0
    assert "ERR address" in completed.stderr
    path = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.bind(str(path))
        silent.listen(4)  # accepts, never answers
        completed = run_reporter(path, authdaemon, "timeout=0.3")
    assert completed.returncode == 0
    assert f"no answer from {path} within 0.3s" in completed.stderr


def test_it_is_executable_with_the_system_python() -> None:
    assert os.access(REPORTER, os.X_OK)
    assert REPORTER.read_text().startswith("#!/usr/bin/python3 -IS\n")
