"""``popauth follow`` with real POP3 servers that log through a real rsyslog.

Each server runs privately (``harness/logservers.py``): its syslog()
reaches a private rsyslog that writes the follower's log with the contrib
template. A real POP3 login is followed, reported to ``popauth serve``, and
the client then relays through the real Postfix of ``conftest.py``.

Each test uses its own client addresses (127.0.0.x), and waits for a
login it expects before it asserts that an earlier line whitelisted nothing:
the follower handles the log in order.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from harness.dovecot import pop3_login
from harness.logservers import (
    MAIL_UID,
    InetdServer,
    Jail,
    NamespacedPopa3d,
    PrivateRsyslog,
    cyrus_pop3d,
    ensure_package_root,
)
from harness.popauth import FollowerProcess, PopauthServer, wait_until
from harness.ports import free_port
from harness.postfix import PostfixInstance
from harness.smtp import REMOTE, rcpt_reply
from tests.live.conftest import PopauthFactory

pytestmark = pytest.mark.live

USERS = {"alice": "wonderland"}


@dataclass(frozen=True)
class ServerSpec:
    name: str
    follow_format: str
    binary: str  # run per connection from the inetd acceptor; "" = see below
    system_users: tuple[str, ...] = ()
    extra_mounts: tuple[str, ...] = ()
    pam_service: str = ""
    trusted_users: tuple[str, ...] = ("root",)
    follower_wrapper: tuple[str, ...] = ()


SERVERS = {
    "solid-pop3d": ServerSpec(
        "solid-pop3d",
        "solid-pop3d",
        "usr/sbin/solid-pop3d",
        system_users=("spop3d",),
        # Its bulletin directory (made by the package), on a private /var/lib.
        extra_mounts=(
            "mount -t tmpfs tmpfs /var/lib",
            "mkdir -p /var/lib/solid-pop3d/bulletins",
        ),
    ),
    # Courier's log is refused on a host where a mail user can run programs
    # (docs/follow.rst); its logins are reported by the PAM reporter instead,
    # tested with a real Courier in test_follow_forgery_live.py.
    # Cyrus's services run (and log) as the cyrus user.
    "cyrus": ServerSpec("cyrus", "cyrus", "", trusted_users=("cyrus",)),
    # Standalone popa3d, in a network namespace of its own (it listens on
    # port 110 of every address).
    "popa3d": ServerSpec(
        "popa3d",
        "popa3d",
        "",
        system_users=("popa3d",),
        extra_mounts=("mount -t tmpfs tmpfs /var/lib", "mkdir -m 755 /var/lib/popa3d"),
    ),
}

Login = Callable[..., bool]


@pytest.fixture(scope="module")
def package_root(live_root: Path) -> Path:
    return ensure_package_root(live_root / "logservers")


@pytest.fixture(scope="module")
def rsyslog(live_root: Path, package_root: Path) -> Iterator[PrivateRsyslog]:
    instance = PrivateRsyslog(live_root / "rsyslog", package_root).start()
    yield instance
    instance.stop()


@pytest.fixture(scope="module", params=sorted(SERVERS))
def pop_server(
    request: pytest.FixtureRequest, live_root: Path, package_root: Path, rsyslog: PrivateRsyslog
) -> Iterator[tuple[ServerSpec, Login]]:
    spec = SERVERS[request.param]
    jail = Jail(
        live_root / f"jail-{spec.name}",
        rsyslog.socket_path,
        USERS,
        system_users=spec.system_users,
        extra_mounts=spec.extra_mounts,
    )
    jail.prepare((spec.pam_service or spec.name,))
    port = free_port()
    server: InetdServer | NamespacedPopa3d
    if spec.name == "cyrus":
        server = cyrus_pop3d(jail, port, package_root, USERS).start()
    elif spec.name == "popa3d":
        server = NamespacedPopa3d(jail, package_root).start()
    else:
        server = InetdServer(jail, port, [str(package_root / spec.binary)]).start()

    def login(source_ip: str, password: str = "wonderland") -> bool:
        if isinstance(server, NamespacedPopa3d):
            return server.login(source_ip, "alice", password)
        return pop3_login(port, "alice", password, source_ip)

    # The follower runs on the server's host: it sees the same users.
    passwd = jail.root / "etc" / "passwd"
    users = (
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        f'mount --bind {passwd} /etc/passwd && exec "$@"',
        "follow",
    )
    yield replace(spec, follower_wrapper=users), login
    server.stop()


@pytest.fixture
def popauth_for_follow(start_popauth: PopauthFactory) -> PopauthServer:
    return start_popauth()


def follower(
    directory: Path, popauth: PopauthServer, rsyslog: PrivateRsyslog, spec: ServerSpec
) -> FollowerProcess:
    directory.mkdir(parents=True, exist_ok=True)
    return FollowerProcess(
        directory,
        popauth,
        str(rsyslog.log_path),
        wrapper=spec.follower_wrapper,
        follow_format=spec.follow_format,
        follow_trusted_users=list(spec.trusted_users),
        # The jail's mail accounts (popa3d counts their own success lines).
        follow_mail_uid_min=MAIL_UID,
        follow_mail_uid_max=MAIL_UID + 49,
    ).start()


def whitelisted(popauth: PopauthServer, address: str) -> bool:
    return popauth.ask(f"QUERY {address}")[0].startswith("OK")


def wait_whitelisted(popauth: PopauthServer, address: str, process: FollowerProcess) -> None:
    wait_until(
        lambda: whitelisted(popauth, address),
        10,
        lambda: f"{address} not whitelisted; follower:\n{process.output()}",
    )


def test_a_real_login_relays_and_a_failed_one_does_not(
    tmp_path: Path,
    pop_server: tuple[ServerSpec, Login],
    rsyslog: PrivateRsyslog,
    postfix: PostfixInstance,
    popauth_for_follow: PopauthServer,
) -> None:
    spec, login = pop_server
    process = follower(tmp_path, popauth_for_follow, rsyslog, spec)
    try:
        assert rcpt_reply(postfix.smtp_port, "127.0.0.21", REMOTE)[0] == 550
        assert not login("127.0.0.22", password="wrong")
        assert login("127.0.0.21"), rsyslog.text()[-2000:]
        wait_whitelisted(popauth_for_follow, "127.0.0.21", process)
        assert rcpt_reply(postfix.smtp_port, "127.0.0.21", REMOTE)[0] == 250
        assert not whitelisted(popauth_for_follow, "127.0.0.22")
        assert rcpt_reply(postfix.smtp_port, "127.0.0.22", REMOTE)[0] == 550
        (event,) = process.events("follow_login")
        assert (event["client_ip"], event["user"]) == ("127.0.0.21", "alice")
    finally:
        assert process.stop() == 0


def test_rotation_mid_run_loses_no_login(
    tmp_path: Path,
    pop_server: tuple[ServerSpec, Login],
    rsyslog: PrivateRsyslog,
    popauth_for_follow: PopauthServer,
) -> None:
    spec, login = pop_server
    process = follower(tmp_path, popauth_for_follow, rsyslog, spec)
    log = rsyslog.log_path
    try:
        assert login("127.0.0.31")
        # Rename rotation: rsyslog writes to the renamed file until HUP.
        log.rename(log.with_name("logins.log.1"))
        assert login("127.0.0.32")
        rsyslog.reopen()
        rsyslog.sync()
        assert login("127.0.0.33")
        # copytruncate rotation.
        rsyslog.sync()
        wait_whitelisted(popauth_for_follow, "127.0.0.33", process)
        shutil.copyfile(log, log.with_name("logins.log.2"))
        with log.open("r+") as handle:
            handle.truncate(0)
        assert login("127.0.0.34")
        for address in ("127.0.0.31", "127.0.0.32", "127.0.0.33", "127.0.0.34"):
            wait_whitelisted(popauth_for_follow, address, process)
    finally:
        assert process.stop() == 0


def test_a_restarted_follower_replays_nothing(
    tmp_path: Path,
    pop_server: tuple[ServerSpec, Login],
    rsyslog: PrivateRsyslog,
    popauth_for_follow: PopauthServer,
) -> None:
    spec, login = pop_server
    first = follower(tmp_path, popauth_for_follow, rsyslog, spec)
    assert login("127.0.0.41")
    wait_whitelisted(popauth_for_follow, "127.0.0.41", first)
    assert first.stop() == 0
    popauth_for_follow.ask("REVOKE 127.0.0.41")
    assert login("127.0.0.42")  # while the follower is stopped
    second = follower(tmp_path, popauth_for_follow, rsyslog, spec)
    try:
        assert login("127.0.0.43")
        wait_whitelisted(popauth_for_follow, "127.0.0.43", second)
        wait_whitelisted(popauth_for_follow, "127.0.0.42", second)
        assert not whitelisted(popauth_for_follow, "127.0.0.41")
    finally:
        assert second.stop() == 0


@pytest.mark.parametrize(
    "injection",
    [
        (
            "dovecot",
            "dovecot",
            "pop3-login: Login: user=<x>, method=PLAIN, rip=203.0.113.9, lip=127.0.0.1",
        ),
        ("solid-pop3d", "solid-pop3d", "user x authenticated - 203.0.113.9"),
    ],
)
def test_a_local_user_cannot_whitelist_with_logger(
    tmp_path: Path,
    rsyslog: PrivateRsyslog,
    popauth_for_follow: PopauthServer,
    injection: tuple[str, str, str],
) -> None:
    follow_format, tag, message = injection
    process = follower(
        tmp_path, popauth_for_follow, rsyslog, ServerSpec(follow_format, follow_format, "")
    )
    try:
        injected = subprocess.run(
            [
                "setpriv",
                "--reuid=nobody",
                "--regid=nogroup",
                "--clear-groups",
                "logger",
                "-u",
                str(rsyslog.socket_path),
                "-t",
                tag,
                message,
            ],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        assert injected.returncode == 0, injected.stderr
        # The same line from a trusted sender (root): it is whitelisted, so the
        # refusal above is the sender's doing, not the line's.
        rsyslog.send(tag, message.replace("203.0.113.9", "203.0.113.10"))
        wait_whitelisted(popauth_for_follow, "203.0.113.10", process)
        assert not whitelisted(popauth_for_follow, "203.0.113.9")
        (refused,) = process.events("follow_refused")
        assert refused["reason"] == "untrusted_sender"
        assert refused["sender_uid"] == 65534
    finally:
        assert process.stop() == 0
