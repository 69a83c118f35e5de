"""Forged login lines, written the ways a local account really can, through real servers.

Issue 18's two open relays in ``popauth follow``, replayed with the real
servers and rsyslog of ``harness/logservers.py`` and the real Postfix of
``conftest.py``; a forged address must get 550.

- **Courier**: the logged-in user writes ``LOGIN, user=victim, ip=[...]`` to
  the stderr that ``courierlogger`` (root) forwards: by tracing its own
  ``courierpop3d`` (ptrace, where the kernel lets users trace their own
  processes, as this machine's does: no Yama; elsewhere the test checks
  that the kernel refuses), and through ``Maildir/loginexec`` (any kernel).
  rsyslog stamps the forged line ``uid=0``. The follower refuses Courier's
  log here; the PAM reporter (``contrib/courier/popauth-courier-login``)
  reports the real login.
- **popa3d**: in a private PID namespace with ``pid_max`` 1000, a stranger
  connects and leaves (or its session process is killed), then ``nobody``
  forks until it gets that session's pid and logs ``Authentication passed
  for nobody``.
"""

from __future__ import annotations

import os
import poplib
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.logservers import (
    MAIL_UID,
    POP3_CLIENT,
    InetdServer,
    Jail,
    PrivateRsyslog,
    courier_pop3d,
    ensure_package_root,
)
from harness.popauth import FollowerProcess, PopauthProcessError, PopauthServer, wait_until
from harness.ports import free_port
from harness.postfix import PostfixInstance
from harness.smtp import REMOTE, rcpt_reply
from popauth.companions.follow.trust import read_ptrace_scope, users_trace_own_processes
from tests.live.conftest import PopauthFactory
from tests.live.pidns import PidNamespace

pytestmark = pytest.mark.live

REPO = Path(__file__).resolve().parents[2]
REPORTER = REPO / "contrib" / "courier" / "popauth-courier-login"
PTRACE_WRITE = Path(__file__).with_name("ptrace_write.py")
PID_REUSE = Path(__file__).with_name("pid_reuse.py")
SYSTEM_PYTHON = "/usr/bin/python3"
USERS = {"alice": "wonderland"}
ALICE_UID = MAIL_UID  # the jail's first user


@pytest.fixture(scope="module")
def package_root(live_root: Path) -> Path:
    return ensure_package_root(live_root / "logservers")


def whitelisted(popauth: PopauthServer, address: str) -> bool:
    return popauth.ask(f"QUERY {address}")[0].startswith("OK")


def as_user(uid: int, argv: list[str]) -> list[str]:
    """``argv`` as a plain local account: that uid and gid, no other groups."""
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]


def run(argv: list[str], stdin: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=120, check=False
    )


# --- Courier -----------------------------------------------------------------


@pytest.fixture(scope="module")
def courier_rsyslog(live_root: Path, package_root: Path) -> Iterator[PrivateRsyslog]:
    instance = PrivateRsyslog(live_root / "rsyslog-courier-forgery", package_root).start()
    yield instance
    instance.stop()


@dataclass(frozen=True)
class CourierHost:
    jail: Jail
    port: int
    rsyslog: PrivateRsyslog


@pytest.fixture(scope="module")
def courier(
    live_root: Path, package_root: Path, courier_rsyslog: PrivateRsyslog, popauth_dir: Path
) -> Iterator[CourierHost]:
    """Courier's POP3 server with the PAM reporter in its account stack."""
    jail = Jail(live_root / "jail-courier-forgery", courier_rsyslog.socket_path, USERS)
    jail.prepare(("pop3",))
    reporter = jail.root / "popauth-courier-login"  # a copy root reaches from anywhere
    shutil.copy(REPORTER, reporter)
    reporter.chmod(0o755)
    pam = jail.root / "etc" / "pam.d" / "pop3"
    pam.write_text(
        pam.read_text() + "account optional pam_exec.so quiet "
        f"{reporter} socket={popauth_dir / 'ingest.sock'}\n"
    )
    port = free_port()
    server: InetdServer = courier_pop3d(jail, port, package_root).start()
    yield CourierHost(jail, port, courier_rsyslog)
    server.stop()


class Pop3Session:
    """A POP3 login from ``source`` kept open, as a mail program keeps it while it reads."""

    def __init__(self, port: int, source: str, user: str, password: str) -> None:
        class Bound(poplib.POP3):
            def _create_socket(self, timeout: float) -> socket.socket:
                return socket.create_connection(
                    (self.host, self.port), timeout, source_address=(source, 0)
                )

        self.client = Bound("127.0.0.1", port, timeout=10)
        self.client.user(user)
        self.client.pass_(password)

    def quit(self) -> None:
        self.client.quit()


def courierpop3d_of(uid: int) -> int:
    """The pid of the courierpop3d serving the user ``uid`` (exactly one)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            exe = os.readlink(entry / "exe")
        except OSError:
            continue
        uids = re.search(r"^Uid:\s+(\d+)", status, re.MULTILINE)
        if uids and int(uids[1]) == uid and exe.endswith("/courierpop3d"):
            found.append(int(entry.name))
    assert len(found) == 1, found
    return found[0]


def forge_by_ptrace(port: int, line: str) -> str:
    """alice logs in, then traces her own courierpop3d and writes ``line`` to its fd 2.

    Where the kernel keeps users from tracing their own processes (Yama's
    ptrace_scope 1 or more), the kernel must refuse, and nothing is written."""
    session = Pop3Session(port, "127.0.0.61", "alice", USERS["alice"])
    try:
        target = courierpop3d_of(ALICE_UID)
        injected = run(
            as_user(ALICE_UID, [SYSTEM_PYTHON, "-I", "-", str(target), "2", line + "\n"]),
            PTRACE_WRITE.read_text(),
        )
        if users_trace_own_processes(read_ptrace_scope()):
            assert injected.returncode == 0, injected.stderr
        else:
            assert "Operation not permitted" in injected.stderr, injected.stderr
        return injected.stdout + injected.stderr
    finally:
        session.quit()


def forge_by_loginexec(jail: Jail, port: int, line: str) -> str:
    """alice puts a Maildir/loginexec that writes ``line`` to stderr, then logs in."""
    script = f"#!/bin/sh\necho '{line}' >&2\nexit 0\n"
    loginexec = jail.root / "home" / "alice" / "Maildir" / "loginexec"
    written = run(
        as_user(ALICE_UID, ["sh", "-c", f"cat > {loginexec}; chmod 700 {loginexec}"]), script
    )
    assert written.returncode == 0, written.stderr
    Pop3Session(port, "127.0.0.61", "alice", USERS["alice"]).quit()
    return "loginexec"


def follower_or_its_refusal(
    directory: Path, popauth: PopauthServer, log: Path, follow_format: str
) -> FollowerProcess:
    """``popauth follow`` as an operator would start it; it may refuse to start."""
    directory.mkdir(parents=True, exist_ok=True)
    process = FollowerProcess(directory, popauth, str(log), follow_format=follow_format)
    try:
        process.start()
    except PopauthProcessError:
        assert process.process is not None and process.process.poll() is not None
    return process


def judged_or_refused(process: FollowerProcess, address: str) -> bool:
    """The follower has stopped, or has judged the forged line about ``address``."""
    if process.process is None or process.process.poll() is not None:
        return True
    events = process.events("follow_login") + process.events("follow_refused")
    return any(address in str(event) for event in events)


@pytest.mark.parametrize("route", ["ptrace", "loginexec"])
def test_a_mail_user_cannot_whitelist_by_forging_courier_login_lines(
    tmp_path: Path,
    route: str,
    courier: CourierHost,
    postfix: PostfixInstance,
    start_popauth: PopauthFactory,
) -> None:
    """Issue 18, defect 1: the forged line is really root-stamped in the log,
    and whitelists nothing; alice's real login is reported by the PAM stack."""
    jail, port, courier_rsyslog = courier.jail, courier.port, courier.rsyslog
    forged_address = "127.0.0.62" if route == "ptrace" else "127.0.0.63"
    line = f"LOGIN, user=victim, ip=[{forged_address}], port=[1], protocol=POP3"
    popauth = start_popauth()
    follower = follower_or_its_refusal(
        tmp_path / "follow", popauth, courier_rsyslog.log_path, follow_format="courier"
    )
    try:
        assert rcpt_reply(postfix.smtp_port, forged_address, REMOTE)[0] == 550
        if route == "ptrace":
            said = forge_by_ptrace(port, line)
        else:
            said = forge_by_loginexec(jail, port, line)
        courier_rsyslog.sync()
        stamped = re.search(
            rf"uid=0 pid=\d+ courierpop3login: {re.escape(line)}$",
            courier_rsyslog.text(),
            re.MULTILINE,
        )
        traceable = users_trace_own_processes(read_ptrace_scope())
        if route == "ptrace" and not traceable:
            assert not stamped, said  # the kernel refused the trace
        else:  # the forwarding is real: the forged line is root's in the log
            assert stamped, f"{said}\n{courier_rsyslog.text()[-2000:]}"
        wait_until(
            lambda: judged_or_refused(follower, forged_address),
            15,
            lambda: f"the follower neither stopped nor judged the line:\n{follower.output()}",
        )
        assert not whitelisted(popauth, forged_address)
        assert rcpt_reply(postfix.smtp_port, forged_address, REMOTE)[0] == 550
        # The follower refused Courier's log, naming both ways in and the reporter.
        assert follower.process is not None and follower.process.wait(10) == 2
        refusal = follower.output()
        assert "courier's LOGIN line is written by a process of the logged-in user" in refusal
        assert "Maildir/loginexec" in refusal
        assert ("trace its own courierpop3d" in refusal) == traceable
        # alice's real login, reported from authdaemond's PAM stack, relays.
        assert whitelisted(popauth, "127.0.0.61")
        assert rcpt_reply(postfix.smtp_port, "127.0.0.61", REMOTE)[0] == 250
    finally:
        follower.stop()


def test_the_pam_reporter_reports_real_logins_only(
    courier: CourierHost, postfix: PostfixInstance, start_popauth: PopauthFactory
) -> None:
    port, courier_rsyslog = courier.port, courier.rsyslog
    popauth = start_popauth()
    with pytest.raises(poplib.error_proto):
        Pop3Session(port, "127.0.0.64", "alice", "wrong")
    Pop3Session(port, "127.0.0.65", "alice", USERS["alice"]).quit()
    # The reporter ran inside the login, before +OK: no waiting.
    assert popauth.ask("QUERY 127.0.0.65")[0].startswith("OK address=127.0.0.65 user=alice")
    assert rcpt_reply(postfix.smtp_port, "127.0.0.65", REMOTE)[0] == 250
    assert not whitelisted(popauth, "127.0.0.64")
    assert rcpt_reply(postfix.smtp_port, "127.0.0.64", REMOTE)[0] == 550
    assert "popauth-courier-login" not in courier_rsyslog.text()  # it had nothing to say


# --- popa3d in a PID namespace -------------------------------------------------


@pytest.fixture(scope="module")
def namespace() -> Iterator[PidNamespace]:
    instance = PidNamespace(pid_max=1000).start()
    yield instance
    instance.stop()


@dataclass(frozen=True)
class Popa3dHost:
    jail: Jail
    rsyslog: PrivateRsyslog
    namespace: PidNamespace


@pytest.fixture(scope="module")
def popa3d(live_root: Path, package_root: Path, namespace: PidNamespace) -> Iterator[Popa3dHost]:
    """rsyslog and standalone popa3d, both in the namespace: the pids rsyslog
    records are popa3d's own (the kernel gives a receiver the sender's pid as
    its own PID namespace numbers it)."""
    rsyslog = PrivateRsyslog(
        live_root / "rsyslog-popa3d-forgery", package_root, prefix=tuple(namespace.enter([]))
    ).start()
    jail = Jail(
        live_root / "jail-popa3d-forgery",
        rsyslog.socket_path,
        USERS,
        system_users=("popa3d",),
        extra_mounts=("mount -t tmpfs tmpfs /var/lib", "mkdir -m 755 /var/lib/popa3d"),
    )
    jail.prepare(("popa3d",))
    output = (jail.root / "popa3d.out").open("ab")
    server = subprocess.Popen(
        namespace.enter(jail.command([str(package_root / "usr/sbin/popa3d"), "-D"]), net=True),
        stdout=output,
        stderr=output,
    )
    output.close()
    yield Popa3dHost(jail, rsyslog, namespace)
    namespace.stop()  # every process in it, popa3d and rsyslog included
    server.wait(10)
    rsyslog.stop()


def pop3_in_namespace(namespace: PidNamespace, source: str, password: str) -> bool:
    """A whole POP3 login as alice, from ``source`` in the namespace's network."""
    result = namespace.run(
        [SYSTEM_PYTHON, "-I", str(POP3_CLIENT), source, "110", "alice", password],
        pid=False,
        net=True,
    )
    return result.stdout.strip() == "ok"


STRANGER = """
import socket, sys
connection = socket.create_connection(("127.0.0.1", 110), 10, source_address=(sys.argv[1], 0))
assert connection.recv(512).startswith(b"+OK")
print("connected", flush=True)
sys.stdin.readline()  # until the test lets it go
if sys.argv[2] == "quit":
    connection.sendall(b"QUIT\\r\\n")
    connection.recv(512)
connection.close()
"""


def session_pid(rsyslog: PrivateRsyslog, address: str) -> int:
    """The pid of the popa3d child that logged ``Session from address`` (as root)."""

    def found() -> int | None:
        rsyslog.sync()
        match = re.search(
            rf"^\S+ uid=0 pid=(\d+) popa3d\[\1\]: Session from {re.escape(address)}$",
            rsyslog.text(),
            re.MULTILINE,
        )
        return int(match[1]) if match else None

    pid: int = wait_until(found, 15, lambda: f"no session line:\n{rsyslog.text()[-2000:]}")
    return pid


@pytest.mark.parametrize("stranger_ends", ["quits", "is_killed"])
def test_a_reused_pid_lends_no_stranger_its_address(
    tmp_path: Path,
    stranger_ends: str,
    popa3d: Popa3dHost,
    postfix: PostfixInstance,
    start_popauth: PopauthFactory,
) -> None:
    """Issue 18, defect 2. The stranger's session ends two ways: it quits
    (popa3d says so), or its process is killed and says nothing. Then
    ``nobody`` takes the pid and logs a success line naming itself."""
    jail, rsyslog, namespace = popa3d.jail, popa3d.rsyslog, popa3d.namespace
    stranger = "127.0.0.72" if stranger_ends == "quits" else "127.0.0.74"
    sentinel = "127.0.0.73" if stranger_ends == "quits" else "127.0.0.75"
    popauth = start_popauth()
    follower = FollowerProcess(
        tmp_path,
        popauth,
        str(rsyslog.log_path),
        # The follower sees popa3d's users: the jail's passwd.
        wrapper=(
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            f'mount --bind {jail.root / "etc" / "passwd"} /etc/passwd && exec "$@"',
            "follow",
        ),
        follow_format="popa3d",
        follow_trusted_users=["root"],
        # The jail's mail accounts: MAIL_UID and the next few.
        follow_mail_uid_min=MAIL_UID,
        follow_mail_uid_max=MAIL_UID + 49,
    ).start()
    try:
        # The real thing works in this namespace: alice's login relays.
        assert pop3_in_namespace(namespace, "127.0.0.71", USERS["alice"])
        wait_until(lambda: whitelisted(popauth, "127.0.0.71"), 15, follower.output)
        # The stranger's session gets a pid above the 300 never handed out twice.
        namespace.set_last_pid(500)
        client = subprocess.Popen(
            namespace.enter(
                [SYSTEM_PYTHON, "-I", "-c", STRANGER, stranger, stranger_ends], pid=False, net=True
            ),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert client.stdout is not None and client.stdin is not None
        assert client.stdout.readline() == "connected\n"
        pid = session_pid(rsyslog, stranger)
        if stranger_ends == "is_killed":
            host_pid = namespace.host_pid(pid)
            assert host_pid is not None
            os.kill(host_pid, signal.SIGKILL)  # dies without a word
        client.stdin.write("\n")
        client.stdin.close()
        assert client.wait(15) == 0
        # nobody forks round the namespace's pids until it has the session's.
        # (nsenter needs root; setpriv then becomes nobody inside.)
        reuse = [SYSTEM_PYTHON, "-I", "-", str(pid), str(rsyslog.socket_path), "popa3d"]
        forger = as_user(65_534, [*reuse, "Authentication passed for nobody"])
        forged = run(namespace.enter(forger), PID_REUSE.read_text())
        assert forged.returncode == 0, forged.stderr
        rsyslog.sync()
        assert f"uid=65534 pid={pid} popa3d[{pid}]: Authentication passed for nobody" in (
            rsyslog.text()
        ), forged.stdout
        # A later real login: once it is whitelisted, the forged line was judged.
        assert pop3_in_namespace(namespace, sentinel, USERS["alice"])
        wait_until(lambda: whitelisted(popauth, sentinel), 15, follower.output)
        assert not whitelisted(popauth, stranger)
        assert rcpt_reply(postfix.smtp_port, stranger, REMOTE)[0] == 550
        assert rcpt_reply(postfix.smtp_port, sentinel, REMOTE)[0] == 250
        refused = [e for e in follower.events("follow_refused") if f"pid={pid} " in e["line"]]
        reason = "no_session" if stranger_ends == "quits" else "not_a_mail_account"
        assert [event["reason"] for event in refused] == [reason], follower.output()
    finally:
        assert follower.stop() == 0
