"""`popauth serve` and local delivery: no start without it, no stop held by relearning it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from harness.popauth import POPAUTH, PopauthServer
from tests.support.settled import write_settled


def test_serve_refuses_to_start_without_local_delivery(tmp_path: Path) -> None:
    config = tmp_path / "popauth.toml"
    config.write_text(
        f'milter_socket = "unix:{tmp_path}/milter.sock"\n'
        f'ingest_socket = "{tmp_path}/ingest.sock"\n'
        'snapshot_path = ""\nusage_path = ""\nblocklist_path = ""\ngraduates_path = ""\n'
        'learn_from_mta = "none"\n'
    )
    completed = subprocess.run(
        [POPAUTH, "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 2, completed
    assert completed.stderr.startswith("popauth: cannot start: local_domains and local_mailers"), (
        completed.stderr
    )
    assert not (tmp_path / "milter.sock").exists()
    assert not (tmp_path / "ingest.sock").exists()


# A postconf that answers until told to hang, then hangs as one waiting on an
# unreachable LDAP server would; it writes its pid where the test can see it.
HANGING_POSTCONF = """#!/bin/sh
if [ -e "$POPAUTH_TEST_HANG" ]; then
    echo $$ > "$POPAUTH_TEST_HANG.pid"
    exec sleep 600
fi
exec {postconf} "$@"
"""


def test_a_stop_during_a_hung_reload_is_prompt_and_saves_the_snapshot(tmp_path: Path) -> None:
    """SIGHUP starts a reload whose postconf hangs; SIGTERM still stops popauth at once."""
    tools = tmp_path / "tools"
    tools.mkdir()
    real_postconf = shutil.which("postconf") or "/usr/sbin/postconf"
    stand_in = tools / "postconf"
    stand_in.write_text(HANGING_POSTCONF.format(postconf=real_postconf))
    stand_in.chmod(0o755)
    postfix_dir = tmp_path / "postfix"
    postfix_dir.mkdir()
    write_settled(
        postfix_dir / "main.cf", "compatibility_level = 3.6\nmydestination = local.test\n"
    )
    (postfix_dir / "master.cf").write_text("")
    hang = tmp_path / "hang"
    snapshot = tmp_path / "state" / "whitelist.json"
    server = PopauthServer(
        tmp_path,
        local_domains=None,
        local_mailers=None,
        postfix_config_directory=str(postfix_dir),
        snapshot_path=str(snapshot),
        snapshot_interval=3600,
    )
    server.environment = {
        "PATH": f"{tools}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "POPAUTH_TEST_HANG": str(hang),
    }
    server.start()
    assert server.process is not None
    try:
        assert server.ask("LOGIN 192.0.2.7 alice")[0].startswith("OK ")
        hang.touch()
        server.process.send_signal(signal.SIGHUP)
        pid_file = Path(f"{hang}.pid")
        deadline = time.monotonic() + 20
        while not (pid_file.exists() and pid_file.read_text().strip()):
            assert time.monotonic() < deadline, server.events()[-5:]
            time.sleep(0.01)
        hung = int(pid_file.read_text())
        # The reload waits on postconf; popauth still serves and still hears a stop.
        assert server.ask("PING") == ["OK pong"]
        server.process.send_signal(signal.SIGTERM)
        # Promptly: long before postconf's 20 s limit, let alone systemd's SIGKILL.
        status = server.process.wait(10)
        server.process = None
    finally:
        server.stop()
    assert status == 0
    entries = json.loads(snapshot.read_text())["entries"]
    assert [entry[:2] for entry in entries] == [["192.0.2.7", "alice"]]
    assert process_gone(hung)
    assert not server.events("local_delivery_reloaded")
    assert not server.events("local_delivery_not_reloaded")
    assert not server.events("reload_abandoned")
    assert server.events("stopped")[-1]["reason"] == "SIGTERM"


def process_gone(pid: int) -> bool:
    """No such process, or a zombie (what the kill left for its reaper)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.01)
    return False
