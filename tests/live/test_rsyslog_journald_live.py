"""The rsyslog snippet with journald in front, on a booted Debian 12 host.

A real host (``tests/live/systemd_host.py``): systemd as PID 1, journald
owning ``/dev/log`` and forwarding to Debian's rsyslog (its stock
configuration, the snippet, and the edit the snippet's header asks for).
journald forwards each message with its sender's credentials; when the
sender is gone by then, the kernel refuses that pid and journald puts its
own, keeping the sender's uid. Here journald is stopped (SIGSTOP) while
short-lived senders log, so that they are surely gone when it forwards.

The follower runs on this machine's file system but in the host's PID
namespace (with a /proc of it), as it would run on that host: it sees
journald's process.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.popauth import FollowerProcess, PopauthServer, wait_until
from harness.stock_rsyslog import SNIPPET, operator_steps
from tests.live.systemd_host import SystemdHost

# Each boots its own Debian host; test-debian13 leaves them to the machine's run.
pytestmark = [pytest.mark.live, pytest.mark.debian_hosts]

LOG = "/var/log/popauth-logins.log"
# A sender that stays alive after it logged (perl-base is in every Debian root).
LIVING_SENDER = (
    "perl -MSocket -e 'socket(S, PF_UNIX, SOCK_DGRAM, 0) or die;"
    ' send(S, "<133>TAG[$$]: MESSAGE", 0, pack_sockaddr_un("/dev/log")) or die "$!"; sleep 3\''
)


@pytest.fixture(scope="module")
def host() -> Iterator[SystemdHost]:
    booted = SystemdHost("bookworm", packages=("rsyslog",)).start()
    try:
        booted.path("/etc/rsyslog.d/10-popauth-follow.conf").write_bytes(SNIPPET.read_bytes())
        booted.sh(" && ".join([*operator_steps(), "systemctl restart rsyslog"]))
        yield booted
    finally:
        booted.stop()


def log_lines(host: SystemdHost, marker: str) -> list[str]:
    path = host.path(LOG)
    text = path.read_text(errors="replace") if path.exists() else ""
    return [line for line in text.splitlines() if marker in line]


def wait_for_lines(host: SystemdHost, marker: str, count: int) -> list[str]:
    found: list[str] = wait_until(
        lambda: len(lines := log_lines(host, marker)) >= count and lines,
        15,
        lambda: f"{count} lines with {marker} not in {LOG}:\n{host.path(LOG).read_text()}",
    )
    return found


def while_journald_is_stopped(host: SystemdHost, commands: list[str]) -> None:
    """Run ``commands`` (short-lived senders) while journald cannot forward."""
    journald = host.main_pid("systemd-journald")
    host.sh("\n".join([f"kill -STOP {journald}", *commands, f"kill -CONT {journald}"]))


def quick_logger(user: str, tag: str, message: str) -> str:
    command = f"logger -p local0.notice -t {shlex.quote(tag)} {shlex.quote(message)}"
    if user == "root":
        return command
    return f"setpriv --reuid={user} --regid=nogroup --clear-groups {command}"


def living_sender(tag: str, message: str) -> str:
    return LIVING_SENDER.replace("TAG", tag).replace("MESSAGE", message) + " &"


def stop_inside(follower: FollowerProcess) -> int:
    """SIGTERM to the follower itself: nsenter, its parent, passes no signal on."""
    process = follower.process
    assert process is not None
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    for child in children:
        os.kill(int(child), signal.SIGTERM)
    status = process.wait(10)
    follower.process = None
    return status


def test_journald_stands_in_front_of_rsyslog(host: SystemdHost) -> None:
    assert host.run(["readlink", "/dev/log"]).stdout.strip() == "/run/systemd/journal/dev-log"
    assert host.run(["systemctl", "is-active", "rsyslog", "syslog.socket"]).returncode == 0
    module = host.run(["grep", '^module(load="imuxsock"', "/etc/rsyslog.conf"]).stdout
    assert 'SysSock.Annotate="on" SysSock.ParseTrusted="on"' in module
    host.sh(quick_logger("root", "first", "marker-first"))
    wait_for_lines(host, "marker-first", 1)
    status = host.path(LOG).stat()
    assert (status.st_uid, status.st_gid, status.st_mode & 0o777) == (0, 4, 0o640)


def test_a_gone_sender_gets_journalds_pid_and_keeps_its_uid(host: SystemdHost) -> None:
    journald = host.main_pid("systemd-journald")
    while_journald_is_stopped(
        host,
        [
            quick_logger("root", "gone-root", "marker-gone"),
            quick_logger("nobody", "gone-nobody", "marker-gone"),
        ],
    )
    host.sh(living_sender("alive", "marker-alive"))
    gone = wait_for_lines(host, "marker-gone", 2)
    (alive,) = wait_for_lines(host, "marker-alive", 1)
    envelopes = sorted(re.search(r" (uid=\S* pid=\S*) ", line)[1] for line in gone)  # type: ignore[index]
    assert envelopes == [f"uid=0 pid={journald}", f"uid=65534 pid={journald}"]
    sender = re.search(r" uid=0 pid=(\d+) alive\[(\d+)\]:", alive)
    assert sender is not None and sender[1] == sender[2] != str(journald), alive


def test_the_follower_refuses_journalds_pid_and_counts_a_living_sender(
    host: SystemdHost, tmp_path: Path
) -> None:
    (tmp_path / "popauth").mkdir()
    # In the host's PID namespace, with its /proc: journald is a process there.
    in_the_hosts_pids = (
        *("nsenter", "-t", str(host.pid), "-p", "--"),
        *("unshare", "-m", "--propagation", "private"),
        *("sh", "-c", 'mount -t proc proc /proc && exec "$@"', "follow"),
    )
    with PopauthServer(tmp_path / "popauth") as server:
        follower = FollowerProcess(
            tmp_path,
            server,
            str(host.path(LOG)),
            wrapper=in_the_hosts_pids,
            follow_format="solid-pop3d",
        ).start()
        try:
            while_journald_is_stopped(
                host,
                [
                    quick_logger("root", "solid-pop3d", "user alice authenticated - 192.0.2.91"),
                    quick_logger("nobody", "solid-pop3d", "user bob authenticated - 192.0.2.93"),
                ],
            )
            host.sh(living_sender("solid-pop3d", "user carol authenticated - 192.0.2.92"))
            wait_until(
                lambda: server.ask("QUERY 192.0.2.92")[0].startswith("OK"),
                15,
                lambda: f"not whitelisted:\n{follower.output()}\n{host.path(LOG).read_text()}",
            )
            refused = follower.wait_for_event("follow_refused", count=2)
        finally:
            assert stop_inside(follower) == 0, follower.output()
        for address in ("192.0.2.91", "192.0.2.93"):
            assert not server.ask(f"QUERY {address}")[0].startswith("OK"), address
    assert sorted((event["reason"], event["sender_uid"]) for event in refused) == [
        ("journald_pid", 0),
        ("journald_pid", 65534),
    ]
    assert follower.events("follow_processes_hidden") == []
