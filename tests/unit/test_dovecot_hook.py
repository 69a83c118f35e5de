"""The contrib Dovecot hook, run as Dovecot runs it: environment in, exec out."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_ingest_server import Endpoint

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


@pytest.fixture
def endpoint(tmp_path: Path) -> Iterator[Endpoint]:
    server = Endpoint(tmp_path)
    server.server.start()
    yield server
    server.server.stop()


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
