"""`popauth serve` with no settings file: the embedded defaults really work.

Runs in a private mount namespace with empty tmpfs over /run and /var/lib, so
that the default paths (/run/popauth/*.sock, /var/lib/popauth/*) are used for
real without touching the host's.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from harness.popauth import POPAUTH

pytestmark = pytest.mark.live

SCRIPT = """
set -e
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /var/lib
"$POPAUTH" serve 2>"$LOG" &
server=$!
tries=0
until [ -S /run/popauth/ingest.sock ] && [ -S /run/popauth/milter.sock ]; do
    tries=$((tries + 1)); [ "$tries" -lt 300 ] || { echo "not ready"; exit 1; }
    sleep 0.02
done
"$POPAUTH" ping
"$POPAUTH" login 192.0.2.1 alice
kill -INT "$server"
wait "$server" && echo "exit=0"
ls /run/popauth /var/lib/popauth
"""


def test_serve_on_embedded_defaults_and_stop_with_sigint(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    # With no local_* settings popauth learns them from the MTA: a Postfix
    # configuration found the way postconf finds it, through MAIL_CONFIG.
    postfix_dir = tmp_path / "postfix"
    postfix_dir.mkdir()
    (postfix_dir / "main.cf").write_text(
        "compatibility_level = 3.6\nmyhostname = mx.defaults.test\n"
        "mydestination = $myhostname, defaults.test\n"
    )
    completed = subprocess.run(
        ["unshare", "--mount", "sh", "-c", SCRIPT],
        env={
            "POPAUTH": POPAUTH,
            "LOG": str(log),
            "PATH": "/usr/bin:/bin:/usr/sbin:/sbin",
            "MAIL_CONFIG": str(postfix_dir),
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, (completed.stdout, completed.stderr, log.read_text())
    output = completed.stdout
    assert "OK pong" in output
    assert "OK address=192.0.2.1 user=alice" in output
    assert "exit=0" in output
    # Sockets removed at stop; the last snapshot written at stop.
    assert "ingest.sock" not in output
    assert "whitelist.json" in output
    text = log.read_text()
    assert "ready" in text
    assert "milter_socket=unix:/run/popauth/milter.sock" in text
    assert "ingest_socket=/run/popauth/ingest.sock" in text
    assert "local_delivery" in text
    assert "mx.defaults.test (postfix mydestination)" in text
    assert "local (postfix local_transport (for mydestination))" in text
    assert "stopped" in text
