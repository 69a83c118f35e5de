"""Smoke tests of the live harness itself: private Postfix and Dovecot instances.

No milter is involved; these only prove that the instances start, answer, stop,
can run side by side, that the Dovecot post-login hook sees ``hook_env``, and
that a daemon left running is found by the end-of-run check.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from harness.dovecot import DovecotInstance, imap_login, pop3_login
from harness.leftovers import processes_inside, stop_leftovers
from harness.ports import free_port, read_banner, wait_pid_gone
from harness.postfix import PostfixInstance
from harness.smtp import SmtpSession

# No skips: a missing daemon or missing root must fail the run, not hide it.
pytestmark = pytest.mark.live

USERS = {"alice": "{PLAIN}secret"}
# A process that waits and names a path on its command line.
SLEEPER = ("/usr/bin/python3", "-c", "import time; time.sleep(300)")


def test_postfix_banner_twice(open_tmp: Path) -> None:
    """Two instances with different roots run at the same time."""
    first = PostfixInstance(root=open_tmp / "pf1", smtp_port=free_port(), milter=None)
    second = PostfixInstance(root=open_tmp / "pf2", smtp_port=free_port(), milter=None)
    with first, second:
        for instance in (first, second):
            banner = read_banner("127.0.0.1", instance.smtp_port)
            assert banner is not None
            assert banner.startswith(b"220 ")
        assert "daemon started" in first.log_text()
    assert "stopping the Postfix mail system" in second.log_text()


def test_dovecot_logins(open_tmp: Path) -> None:
    dovecot = DovecotInstance(
        root=open_tmp / "dovecot", pop3_port=free_port(), imap_port=free_port(), users=USERS
    )
    with dovecot:
        assert pop3_login(dovecot.pop3_port, "alice", "secret", "127.0.0.2")
        assert not pop3_login(dovecot.pop3_port, "alice", "wrong", "127.0.0.2")
        assert dovecot.imap_port is not None
        assert imap_login(dovecot.imap_port, "alice", "secret", "127.0.0.3")


def test_postlogin_hook_sees_hook_env(open_tmp: Path) -> None:
    """The hook runs as ``dovecot`` with USER, IP and every hook_env variable."""
    out = open_tmp / "hook-out"
    out.mkdir()
    out.chmod(0o777)
    hook = open_tmp / "hook.sh"
    hook.write_text(f'#!/bin/sh\nenv > {out}/"$USER-$IP"\nexec "$@"\n', encoding="ascii")
    hook.chmod(0o755)
    dovecot = DovecotInstance(
        root=open_tmp / "dovecot",
        pop3_port=free_port(),
        users=USERS,
        postlogin_hook=hook,
        hook_env={"POPAUTH_SOCKET": "/run/popauth/ingest.sock", "POPAUTH": "/usr/bin/popauth"},
    )
    with dovecot:
        assert pop3_login(dovecot.pop3_port, "alice", "secret", "127.0.0.4")
    env = dict(
        line.split("=", 1)
        for line in (out / "alice-127.0.0.4").read_text(encoding="ascii").splitlines()
    )
    assert env["POPAUTH_SOCKET"] == "/run/popauth/ingest.sock"
    assert env["POPAUTH"] == "/usr/bin/popauth"
    assert env["LOCAL_IP"] == "127.0.0.1"


def test_smtp_auth_through_dovecot(open_tmp: Path) -> None:
    """Postfix SASL via Dovecot: prepare() first, Dovecot, then start()."""
    postfix = PostfixInstance(
        root=open_tmp / "postfix", smtp_port=free_port(), milter=None, sasl_path="private/auth"
    )
    postfix.prepare()
    dovecot = DovecotInstance(
        root=open_tmp / "dovecot",
        pop3_port=free_port(),
        users=USERS,
        auth_socket_for_postfix=postfix.queue_dir / "private" / "auth",
    )
    with (
        dovecot,
        postfix,
        SmtpSession(postfix.smtp_port, "127.0.0.2") as session,
    ):
        assert session.auth_plain("alice", "secret")[0] == 235


def test_a_daemon_left_running_is_found_by_its_directory_and_stopped(open_tmp: Path) -> None:
    """What the end-of-run check relies on: Postfix's master, daemonised into
    its queue directory, and a process naming a file of the run, are found;
    a process naming a directory that merely starts with the same name is not."""
    run = open_tmp / "run"
    run.mkdir()
    other = open_tmp / "run-other"  # "run" is a prefix of its name, not its parent
    other.mkdir()
    postfix = PostfixInstance(root=run / "postfix", smtp_port=free_port(), milter=None)
    named = subprocess.Popen([*SLEEPER, str(run / "a-file")])
    unrelated = subprocess.Popen([*SLEEPER, str(other / "a-file")])
    try:
        postfix.start()
        found = {leftover.pid: leftover.evidence for leftover in processes_inside([run])}
        master = int((postfix.queue_dir / "pid" / "master.pid").read_text().split()[0])
        assert found.get(master) == "cwd", found
        assert found.get(named.pid) == "cmdline", found
        assert unrelated.pid not in found
        stopped = {leftover.pid for leftover in stop_leftovers([run])}
        assert {master, named.pid} <= stopped
        assert named.wait(10) == -signal.SIGTERM
        assert wait_pid_gone(master, time.monotonic() + 10)
        assert processes_inside([run]) == []
        assert unrelated.poll() is None
    finally:
        postfix.stop()
        for process in (named, unrelated):
            process.kill()
            process.wait()
