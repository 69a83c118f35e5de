"""``make run`` as a new user meets it: the try-it mode on a host with no MTA, and
one line when popauth already runs here as a service.

The popauth command is read from ``make -n run`` (the bootstrap step is
not run: it would rebuild the test venv for running only), then run as make
runs it, from the checkout, in a private mount namespace:

- with empty directories over /etc/postfix and /etc/mail, so that no MTA is
  configured whatever this host has: it must serve the try-it mode, and the
  commands it prints must work exactly as printed;
- with tmpfs over /run and /var/lib and a configured Postfix, where a popauth
  already serves /run/popauth, or has left its state to another user.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from harness.popauth import POPAUTH

pytestmark = pytest.mark.live

REPO = Path(__file__).resolve().parents[2]
# Mask the MTA configurations in a private mount namespace, then run "$@".
NO_MTA = """
set -e
for directory in /etc/postfix /etc/mail; do
    if [ -d "$directory" ]; then mount -t tmpfs tmpfs "$directory"; fi
done
exec "$@"
"""
# postconf would read a configuration named there instead of /etc/postfix.
WITHOUT_MAIL_CONFIG = {name: value for name, value in os.environ.items() if name != "MAIL_CONFIG"}


def make_command(target: str, **variables: str) -> list[str]:
    """The popauth command that ``make TARGET`` runs, as make would run it."""
    overrides = [f"{name}={value}" for name, value in variables.items()]
    dry_run = subprocess.run(
        ["make", "-n", "-s", "-C", str(REPO), target, *overrides],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()
    assert any(line.startswith("scripts/bootstrap run") for line in dry_run), dry_run
    served = [line for line in dry_run if " serve " in line]
    assert len(served) == 1, dry_run
    return shlex.split(served[0])


def wait_for(predicate: object, what: str, timeout: float = 30.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not {what} within {timeout} s"
        time.sleep(0.05)


def test_make_run_serves_the_try_it_mode_and_its_commands_work_as_printed(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "try-it"
    command = make_command("run", TRY_IT_DIR=str(directory))
    assert command[1:3] == ["serve", "--try-it-if-no-mta"]
    log = tmp_path / "serve.log"
    with log.open("wb") as errors:
        process = subprocess.Popen(
            ["unshare", "--mount", "sh", "-c", NO_MTA, "sh", *command],
            cwd=REPO,
            env=WITHOUT_MAIL_CONFIG,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )
    try:
        assert process.stdout is not None
        printed = []
        for line in process.stdout:
            printed.append(line.rstrip("\n"))
            if line.startswith("The milter listens on"):
                break
        assert printed, log.read_text()
        wait_for(lambda: "ready" in log.read_text(), "ready")
        text = log.read_text()
        assert "local_delivery source=configured" in text
        for name in ("milter.sock", "ingest.sock", "socketmap.sock"):
            assert (directory / name).is_socket(), name
        assert printed[0].startswith(
            "popauth try-it mode: this host has no Postfix or Sendmail configuration"
        ), printed
        assert f"on sockets under {directory}, where no MTA is attached" in printed[0]

        results = run_as_printed(printed)
        outcomes = [(words[1], output.splitlines()[0]) for words, output in results]
        assert outcomes == [
            ("explain", "verdict: reject (relay_denied), at RCPT TO, for this recipient"),
            ("explain", "verdict: accept (local_recipient), at RCPT TO, for this recipient"),
            ("login", outcomes[2][1]),
            ("query", outcomes[3][1]),
            # The relay budget (on by default) counts each relayed recipient,
            # so the milter settles a POP-first message at RCPT.
            ("explain", "verdict: accept (whitelisted), at RCPT TO, for this recipient"),
            ("revoke", outcomes[5][1]),
            ("explain", "verdict: reject (relay_denied), at RCPT TO, for this recipient"),
            (
                "explain",
                "verdict: accept (smtp_auth), at MAIL FROM, for every recipient of the message",
            ),
        ], outcomes
        assert outcomes[2][1].startswith("OK address=192.0.2.10 user=joe ")
        # query prints a table: a header, then the entry with its dates and
        # what is left of its relay budget (on by default).
        query_rows = results[3][1].splitlines()
        assert query_rows[0].split() == [
            "address",
            "user",
            "granted",
            "expires",
            "users",
            "budget_left",
            "budget_ends",
        ]
        assert "1000/1000" in query_rows[1].split(), query_rows
        assert query_rows[1].split()[:2] == ["192.0.2.10", "joe"]
        assert "never granted since popauth started" in results[0][1]
        assert "a REVOKE of the address removed it at " in results[6][1]

        # A second make run beside it: one line, naming the first, saying what to do.
        again = subprocess.run(
            ["unshare", "--mount", "sh", "-c", NO_MTA, "sh", *command],
            cwd=REPO,
            env=WITHOUT_MAIL_CONFIG,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert again.returncode == 2
        assert again.stdout == ""
        assert again.stderr.splitlines() == [
            f"popauth: popauth already runs here (pid {process.pid}, user root) and serves"
            f" {directory / 'ingest.sock'}: it is this checkout's try-it popauth: use the"
            " commands it printed, or stop it (Ctrl-C in its terminal) first"
        ]
    finally:
        process.send_signal(signal.SIGINT)
        status = process.wait(30)
    assert status == 0, log.read_text()
    assert "stopped reason=SIGINT" in log.read_text()
    assert not (directory / "ingest.sock").exists()


def run_as_printed(printed: list[str]) -> list[tuple[list[str], str]]:
    """Run the indented command lines in order, a ``cd`` included; their outputs."""
    commands = [line.strip() for line in printed if line.startswith("    ")]
    first, *rest = commands
    words = shlex.split(first)
    assert words[0] == "cd" and len(words) == 2, first
    where = Path(words[1])
    assert len(rest) == 8, rest
    results = []
    for command in rest:
        words = shlex.split(command)
        completed = subprocess.run(
            words, cwd=where, capture_output=True, text=True, timeout=30, check=False
        )
        assert completed.returncode == 0, (command, completed.stdout, completed.stderr)
        results.append((words, completed.stdout))
    return results


SERVICE = """
set -e
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /var/lib
cd "$REPO"
# popauth as a service: serve on the default paths.
"$POPAUTH" serve 2>"$LOG" &
service=$!
tries=0
until [ -S /run/popauth/ingest.sock ] && [ -S /run/popauth/milter.sock ]; do
    tries=$((tries + 1)); [ "$tries" -lt 1500 ] || { echo "not ready"; exit 1; }
    sleep 0.02
done
echo "service=$service"
set +e
timeout 60 sh -c "$RUN" >/dev/null 2>"$TMP/running.err"
echo "running=$?"
set -e
kill -INT "$service"
wait "$service"
# A stopped service leaves its state to its own user.
chown nobody /var/lib/popauth
set +e
timeout 60 sh -c "$RUN" >/dev/null 2>"$TMP/foreign.err"
echo "foreign=$?"
"""


def test_make_run_beside_a_popauth_service_says_so_in_one_line(tmp_path: Path) -> None:
    # An MTA is configured here, so make run is plain serve on the default paths.
    postfix = tmp_path / "postfix"
    postfix.mkdir()
    (postfix / "main.cf").write_text(
        "compatibility_level = 3.6\nmyhostname = mx.service.test\nmydestination = $myhostname\n"
    )
    run = shlex.join(make_command("run", TRY_IT_DIR=str(tmp_path / "try-it")))
    completed = subprocess.run(
        ["unshare", "--mount", "sh", "-c", SERVICE],
        env={
            "POPAUTH": POPAUTH,
            "REPO": str(REPO),
            "RUN": run,
            "LOG": str(tmp_path / "service.log"),
            "TMP": str(tmp_path),
            "PATH": os.environ.get("PATH", "/usr/bin:/bin:/usr/sbin:/sbin"),
            "MAIL_CONFIG": str(postfix),
        },
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert completed.returncode == 0, (completed.stdout, completed.stderr)
    fields = dict(line.split("=", 1) for line in completed.stdout.split())
    assert fields["running"] == "2"
    assert (tmp_path / "running.err").read_text().splitlines() == [
        f"popauth: popauth already runs here (pid {fields['service']}, user root) and serves"
        " /run/popauth/ingest.sock: use it (popauth ping), or stop it first (systemctl stop"
        " popauth); or run this checkout beside it on sockets of its own: make try"
    ]
    assert fields["foreign"] == "2"
    assert (tmp_path / "foreign.err").read_text().splitlines() == [
        "popauth: /var/lib/popauth belongs to user nobody: another popauth keeps its state"
        " there, and this one runs as root: popauth is set up as a service here: start it"
        " (systemctl start popauth), or run this checkout beside it on paths of its own:"
        " make try"
    ]


def test_make_try_forces_the_try_it_mode() -> None:
    command = make_command("try", TRY_IT_DIR="/nonexistent/try-it")
    assert command[1:] == ["serve", "--try-it", "/nonexistent/try-it"]
