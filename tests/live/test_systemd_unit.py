"""contrib/systemd/popauth.service, tested as far as possible without systemd.

No systemd runs here, so the pieces are tested for real: ``systemd-analyze
verify`` of the unit; and ``popauth serve`` started the way the unit starts
it: as an unprivileged user with the postfix and dovecot groups, inside a
private mount namespace that reproduces ``ProtectSystem=strict`` (every mount
read-only) with the unit's writable paths (``RuntimeDirectory``,
``StateDirectory``, ``ReadWritePaths``, the spool directory its
``ExecStartPre=+`` creates) and a ``NOTIFY_SOCKET`` the test listens on.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.popauth import toml_value
from tests.support.peers import ask_as
from tests.support.units import verify_unit

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "contrib" / "systemd" / "popauth.service"
# The service user in this test: any unprivileged account will do, given the
# groups docs/systemd.rst gives the popauth user.
SERVICE_USER = "nobody"
SERVICE_GROUPS = ("postfix", "dovecot")


def connects_as(user: str, path: Path) -> bool:
    """Whether a process running as ``user`` (its own groups only) can connect to ``path``."""
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        status = 1
        try:
            entry = pwd.getpwnam(user)
            os.setgroups([])
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.connect(str(path))
            status = 0
        finally:
            os._exit(status)
    _, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status) == 0


def unit_lines(key: str) -> list[str]:
    return [
        line.split("=", 1)[1]
        for line in UNIT.read_text(encoding="utf-8").splitlines()
        if line.startswith(f"{key}=")
    ]


def test_the_unit_verifies(tmp_path: Path) -> None:
    """systemd-analyze only warns about unknown keys: any output is a failure.

    It does not look the popauth user up, so this holds on a host without it.
    """
    assert verify_unit(UNIT, tmp_path) == (0, "")


def test_the_unit_runs_popauth_unprivileged_and_notifies() -> None:
    assert unit_lines("Type") == ["notify"]
    assert unit_lines("User") == ["popauth"]
    assert unit_lines("ProtectSystem") == ["strict"]
    assert unit_lines("RuntimeDirectory") == ["popauth"]
    assert unit_lines("StateDirectory") == ["popauth"]
    assert unit_lines("ReadWritePaths") == ["-/var/spool/postfix/popauth"]
    assert unit_lines("ExecReload") == ["/bin/sh -c 'kill -HUP \"$MAINPID\"'"]


def spool_command() -> str:
    """The shell command of the unit's privileged ExecStartPre (it makes the spool dir)."""
    for line in unit_lines("ExecStartPre"):
        if line.startswith("+/bin/sh -c "):
            return line.removeprefix("+/bin/sh -c ").strip("'")
    raise AssertionError("no ExecStartPre=+ in the unit")


# Run as root in a private mount namespace; ends by exec'ing popauth as the
# service user, so the test's child process is popauth itself.
SANDBOX = r"""
set -eu
mount --make-rprivate /
# What systemd prepares before the service starts: RuntimeDirectory= and
# StateDirectory= owned by the service user, then ExecStartPre=+ as root.
mount --bind "$T/run" /run
mount --bind "$T/varlib" /var/lib
mkdir -p /var/spool/postfix
mount --bind "$T/spool" /var/spool/postfix
install -d -o "$SERVICE_USER" -m 0755 /run/popauth
install -d -o "$SERVICE_USER" -m 0700 /var/lib/popauth
sh -c "$(printf '%s' "$SPOOL_COMMAND" | sed "s/-o popauth/-o $SERVICE_USER/")"
# The checkout may be in a directory only root can enter: show it elsewhere.
mount --bind "$REPO" "$T/repo"
# ProtectSystem=strict: every mount read-only, but the writable paths.
writable="/run/popauth /var/lib/popauth /var/spool/postfix/popauth"
for path in $writable; do mount --bind "$path" "$path"; done
awk '{print $2}' /proc/self/mounts | sort -u | while read -r point; do
  case " $writable " in *" $point "*) continue ;; esac
  case "$point" in /proc|/proc/*|/sys|/sys/*|/dev|/dev/*) continue ;; esac
  mount -o remount,bind,ro "$point" 2>/dev/null || true
done
# Prove it: nothing outside the writable paths can be written.
if touch /var/lib/popauth-outside 2>/dev/null || touch /etc/popauth-outside 2>/dev/null; then
  echo "sandbox is not read-only" >&2; exit 3
fi
exec setpriv --reuid="$SERVICE_USER" --regid=nogroup --groups="$SERVICE_GROUPS" \
  --inh-caps=-all --no-new-privs \
  env PYTHONPATH="$T/repo/milter" \
  "$T/repo/.venv/bin/python" -m popauth serve --config "$T/popauth.toml"
"""


@pytest.fixture
def sandbox_root() -> Iterator[Path]:
    root = Path(os.environ.get("TMPDIR", "/tmp")) / f"popauth-sandbox-{os.getpid()}"
    for part in ("run", "varlib", "spool", "repo"):
        (root / part).mkdir(parents=True, mode=0o755)
    root.chmod(0o755)
    yield root
    subprocess.run(["rm", "-rf", str(root)], check=False)


def test_unprivileged_popauth_under_protect_system_strict(sandbox_root: Path) -> None:
    root = sandbox_root
    settings = {
        "milter_socket": "unix:/var/spool/postfix/popauth/milter.sock",
        "milter_socket_mode": "0660",
        "milter_socket_group": "postfix",
        "ingest_socket": "/run/popauth/ingest.sock",
        "ingest_socket_mode": "0660",
        "ingest_socket_group": "dovecot",
        "ingest_allowed_users": ["dovecot"],
        "snapshot_path": "/var/lib/popauth/whitelist.json",
        "usage_path": "/var/lib/popauth/usage.json",
        "blocklist_path": "/var/lib/popauth/blocked.json",
        "local_domains": ["local.test"],
        "local_mailers": ["local"],
        "log_format": "json",
    }
    (root / "popauth.toml").write_text(
        "".join(f"{key} = {toml_value(value)}\n" for key, value in settings.items())
    )
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_name = f"popauth-sandbox-notify-{os.getpid()}"
    notify.bind("\0" + notify_name)
    notify.settimeout(30)
    log = root / "popauth.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            ["unshare", "--mount", "sh", "-c", SANDBOX],
            env={
                "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                "T": str(root),
                "REPO": str(REPO),
                "SERVICE_USER": SERVICE_USER,
                "SERVICE_GROUPS": ",".join(SERVICE_GROUPS),
                "SPOOL_COMMAND": spool_command(),
                "NOTIFY_SOCKET": "@" + notify_name,
            },
            stdout=output,
            stderr=output,
        )
    try:
        try:
            ready = notify.recv(64)
        except TimeoutError:
            ready = b""
        assert ready == b"READY=1", log.read_text()
        ingest = root / "run" / "popauth" / "ingest.sock"
        milter = root / "spool" / "popauth" / "milter.sock"
        service = pwd.getpwnam(SERVICE_USER)
        for path, group in ((ingest, "dovecot"), (milter, "postfix")):
            status = path.stat()
            assert stat.S_IMODE(status.st_mode) == 0o660
            assert status.st_uid == service.pw_uid
            assert status.st_gid == pwd.getpwnam(group).pw_gid
        # Logins from the hook's user work; everyone else is refused.
        assert ask_as("dovecot", ingest, "LOGIN 192.0.2.9 alice").startswith("OK ")
        for stranger in ("daemon", "postfix"):
            assert "PermissionError" in ask_as(stranger, ingest, "LOGIN 192.0.2.66 mallory")
        # The milter socket: postfix reaches it, others do not.
        assert connects_as("postfix", milter)
        assert not connects_as("daemon", milter)
        assert not connects_as("dovecot", milter)
        assert connects_as("dovecot", ingest)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert notify.recv(64) == b"STOPPING=1"
        status_code = process.wait(10)
        elapsed = time.monotonic() - started
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        notify.close()
    assert status_code == 0, log.read_text()
    assert elapsed < 1.5, elapsed
    snapshot = json.loads((root / "varlib" / "popauth" / "whitelist.json").read_text())
    assert [entry[:2] for entry in snapshot["entries"]] == [["192.0.2.9", "alice"]]
    assert not ingest.exists()
    assert not milter.exists()
    text = log.read_text()
    assert re.search(r'"event": "stopped"', text), text
