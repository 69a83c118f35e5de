"""The documented follow deployment, end to end, as its users and groups.

Everything is what the docs and the contrib files say, run for real:

- the users: the ``useradd`` commands of ``docs/systemd.rst`` (``popauth``,
  with its groups) and ``docs/follow.rst`` (``popauth-follow``), run with
  ``--prefix`` on private copies of the user and group files, which the
  processes below see in place of this machine's (a private mount
  namespace each);
- rsyslog: Debian's own, with its stock ``/etc/rsyslog.conf``, the edit and
  the snippet of ``contrib/rsyslog/popauth-follow.conf``
  (``harness/stock_rsyslog.py``); the login line is solid-pop3d's, for a
  real POP3 login, through that rsyslog;
- ``popauth serve`` as ``popauth`` with its groups, in the directories its
  unit gets (``/run/popauth``, ``/var/lib/popauth`` mode 0700), with the
  ingest settings of ``docs/follow.rst``;
- ``popauth follow`` as the ``User=``, ``Group=`` and
  ``SupplementaryGroups=`` of ``contrib/systemd/popauth-follow.service``,
  in its ``ProtectSystem=strict`` sandbox with its ``StateDirectory=``, with
  the default ``follow_state_path``;
- a private Postfix whose milter is that popauth: the client relays once it
  has logged in, and not before.
"""

from __future__ import annotations

import grp
import json
import os
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.dovecot import pop3_login
from harness.logservers import InetdServer, Jail, ensure_package_root
from harness.popauth import FollowerProcess, PopauthProcessError, PopauthServer, wait_until
from harness.ports import free_port
from harness.postfix import PostfixInstance
from harness.smtp import REMOTE, rcpt_reply
from harness.stock_rsyslog import StockRsyslog
from tests.support.units import verify_unit

pytestmark = pytest.mark.live

REPO = Path(__file__).resolve().parents[2]
FOLLOW_UNIT = REPO / "contrib" / "systemd" / "popauth-follow.service"
USER_FILES = ("passwd", "group", "shadow", "gshadow")
MAIL_USERS = {"alice": "wonderland"}

# docs/follow.rst, "Running it", step 3, for a host with Dovecot's hook too.
DEPLOYMENT: dict[str, Any] = {
    "ingest_socket": "/run/popauth/ingest.sock",
    "ingest_socket_mode": "0660",
    "ingest_socket_group": "dovecot",
    "ingest_socket_acl_groups": ["popauth-follow"],
    "ingest_allowed_users": ["dovecot", "popauth-follow"],
    "follow_log": "/var/log/popauth-logins.log",
    "follow_format": "solid-pop3d",
    "follow_trust": "rsyslog",
    "follow_trusted_users": ["root"],
    # docs/systemd.rst's milter lines, with this test's own spool directory.
    "milter_socket_mode": "0660",
    "milter_socket_group": "postfix",
    # popauth's own state files, in its StateDirectory (the defaults).
    "snapshot_path": None,
    "usage_path": None,
    "blocklist_path": None,
    "log_format": "json",
}


def documented_command(doc: Path, program: str, last_word: str) -> list[str]:
    """The ``program ... last_word`` command shown in ``doc``, continuation lines joined."""
    lines = doc.read_text().splitlines()
    for number, line in enumerate(lines):
        command = line.strip()
        if not command.startswith(f"{program} "):
            continue
        following = number
        while command.endswith("\\"):
            following += 1
            command = command[:-1] + " " + lines[following].strip()
        words = shlex.split(command)
        if words[-1] == last_word:
            return words
    raise AssertionError(f"{doc} shows no `{program} ... {last_word}` command")


def unit_values(key: str) -> list[str]:
    return [
        line.split("=", 1)[1]
        for line in FOLLOW_UNIT.read_text().splitlines()
        if line.startswith(f"{key}=")
    ]


class PrivateUsers:
    """Copies of this machine's user and group files, with the documented users added."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.etc = root / "etc"

    def create(self, *commands: list[str]) -> PrivateUsers:
        (self.etc / "default").mkdir(parents=True, exist_ok=True)
        for name in (*USER_FILES, "login.defs"):
            shutil.copy2(Path("/etc") / name, self.etc / name)
        for argv in commands:
            result = subprocess.run(
                [argv[0], "--prefix", str(self.root), *argv[1:]],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert result.returncode == 0, f"{shlex.join(argv)}: {result.stderr}"
        return self

    def mounts(self) -> str:
        return "\n".join(f"mount --bind {self.etc / name} /etc/{name}" for name in USER_FILES)

    def entry(self, name: str) -> list[str]:
        for line in (self.etc / "passwd").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == name:
                return fields
        raise AssertionError(f"no user {name}")


# What systemd prepares for popauth.service (RuntimeDirectory=,
# StateDirectory=), then popauth as its user with its own groups
# (--init-groups: those useradd gave it). The checkout may be in a directory
# only root can enter: it is shown at "$T/repo". The first argument, the
# popauth path PopauthServer puts before "serve", is replaced by that copy.
SERVE = r"""
set -eu
mount --make-rprivate /
$USER_MOUNTS
mount --bind "$T/run" /run
mount --bind "$T/varlib" /var/lib
install -d -o popauth -g popauth -m 0755 /run/popauth
install -d -o popauth -g popauth -m 0700 /var/lib/popauth
mount --bind "$REPO" "$T/repo"
shift
exec setpriv --reuid=popauth --regid=popauth --init-groups --inh-caps=-all --no-new-privs \
  env PYTHONPATH="$T/repo/milter" "$T/repo/.venv/bin/python" -m popauth "$@"
"""

# What systemd prepares for popauth-follow.service: StateDirectory= (with
# its mode), ProtectSystem=strict (every mount read-only but that
# directory), then the follower as User=, Group= and SupplementaryGroups=.
FOLLOW = r"""
set -eu
mount --make-rprivate /
$USER_MOUNTS
mount --bind "$T/run" /run
mount --bind "$T/varlib" /var/lib
mount --bind "$RSYSLOG_LOGS" /var/log
install -d -o "$UNIT_USER" -g "$UNIT_GROUP" -m "$STATE_MODE" "/var/lib/$STATE_DIRECTORY"
mount --bind "$REPO" "$T/repo"
writable="/var/lib/$STATE_DIRECTORY"
mount --bind "$writable" "$writable"
awk '{print $2}' /proc/self/mounts | sort -u | while read -r point; do
  [ "$point" = "$writable" ] && continue
  case "$point" in /proc|/proc/*|/sys|/sys/*|/dev|/dev/*) continue ;; esac
  mount -o remount,bind,ro "$point" 2>/dev/null || true
done
if touch /var/lib/outside-the-sandbox 2>/dev/null; then echo "not read-only" >&2; exit 3; fi
shift
exec setpriv --reuid="$UNIT_USER" --regid="$UNIT_GROUP" --groups="$UNIT_GROUPS" \
  --inh-caps=-all --no-new-privs \
  env PYTHONPATH="$T/repo/milter" "$T/repo/.venv/bin/python" -m popauth "$@"
"""


def wrapper(script: str, environment: dict[str, str]) -> tuple[str, ...]:
    assignments = "".join(f"{key}={shlex.quote(value)}\n" for key, value in environment.items())
    body = script.replace("$USER_MOUNTS", environment["USER_MOUNTS"])
    return ("unshare", "-m", "sh", "-c", assignments + body, "namespace")


class Deployment:
    def __init__(self, root: Path, users: PrivateUsers, rsyslog: StockRsyslog) -> None:
        self.root = root
        self.users = users
        self.rsyslog = rsyslog
        self.milter_dir = root / "milter"
        self.environment = {
            "T": str(root),
            "REPO": str(REPO),
            "USER_MOUNTS": users.mounts(),
            "RSYSLOG_LOGS": str(rsyslog.log_dir),
        }

    @property
    def ingest_path(self) -> Path:
        return self.root / "run" / "popauth" / "ingest.sock"

    @property
    def follow_state_dir(self) -> Path:
        (directory,) = unit_values("StateDirectory")
        return self.root / "varlib" / directory

    def serve(self, **overrides: Any) -> PopauthServer:
        directory = self.root / f"serve-{len(list(self.root.glob('serve-*')))}"
        directory.mkdir(mode=0o755)
        settings = {
            **DEPLOYMENT,
            "milter_socket": f"unix:{self.milter_dir / 'milter.sock'}",
            **overrides,
        }
        server = PopauthServer(directory, wrapper=wrapper(SERVE, self.environment), **settings)
        server.config_path.parent.chmod(0o755)
        server.ingest_path = self.ingest_path
        server.milter_path = self.milter_dir / "milter.sock"
        return server.start()

    def follower(self, server: PopauthServer, **overrides: Any) -> FollowerProcess:
        directory = self.root / f"follow-{len(list(self.root.glob('follow-*')))}"
        directory.mkdir(mode=0o755)
        (user,), (group,) = unit_values("User"), unit_values("Group")
        (state_directory,) = unit_values("StateDirectory")
        (state_mode,) = unit_values("StateDirectoryMode") or ["0755"]
        environment = {
            **self.environment,
            "UNIT_USER": user,
            "UNIT_GROUP": group,
            "UNIT_GROUPS": ",".join(" ".join(unit_values("SupplementaryGroups")).split()),
            "STATE_DIRECTORY": state_directory,
            "STATE_MODE": state_mode,
        }
        settings = {**DEPLOYMENT, "follow_state_path": None, **overrides}
        return FollowerProcess(
            directory,
            server,
            settings.pop("follow_log"),
            wrapper=wrapper(FOLLOW, environment),
            **settings,
        )


@pytest.fixture(scope="module")
def package_root(live_root: Path) -> Path:
    return ensure_package_root(live_root / "logservers")


@pytest.fixture(scope="module")
def deployment_root(live_root: Path) -> Path:
    root = live_root / "deployment"
    for part in ("run", "varlib", "repo", "milter"):
        (root / part).mkdir(parents=True, mode=0o755)
    root.chmod(0o755)
    return root


@pytest.fixture(scope="module")
def users(deployment_root: Path) -> PrivateUsers:
    return PrivateUsers(deployment_root / "users").create(
        documented_command(REPO / "docs" / "systemd.rst", "useradd", "popauth"),
        documented_command(REPO / "docs" / "follow.rst", "useradd", "popauth-follow"),
    )


@pytest.fixture(scope="module")
def rsyslog(deployment_root: Path, package_root: Path) -> Iterator[StockRsyslog]:
    instance = StockRsyslog(deployment_root / "rsyslog", package_root, edit_imuxsock=True)
    instance.start()
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def solid_pop3d(
    deployment_root: Path, package_root: Path, rsyslog: StockRsyslog
) -> Iterator[Callable[[str], bool]]:
    jail = Jail(
        deployment_root / "jail",
        rsyslog.socket_path,
        MAIL_USERS,
        system_users=("spop3d",),
        extra_mounts=("mount -t tmpfs tmpfs /var/lib", "mkdir -p /var/lib/solid-pop3d/bulletins"),
    )
    jail.prepare(("solid-pop3d",))
    port = free_port()
    server = InetdServer(jail, port, [str(package_root / "usr/sbin/solid-pop3d")]).start()
    yield lambda source_ip: pop3_login(port, "alice", "wonderland", source_ip)
    server.stop()


@pytest.fixture(scope="module")
def deployment(deployment_root: Path, users: PrivateUsers, rsyslog: StockRsyslog) -> Deployment:
    made = Deployment(deployment_root, users, rsyslog)
    # The milter's directory, as popauth.service's ExecStartPre=+ makes it
    # in Postfix's spool: popauth's, entered by group postfix.
    popauth_uid = int(users.entry("popauth")[2])
    os.chown(made.milter_dir, popauth_uid, grp.getgrnam("postfix").gr_gid)
    made.milter_dir.chmod(0o750)
    return made


@pytest.fixture(scope="module")
def postfix(deployment_root: Path, deployment: Deployment) -> Iterator[PostfixInstance]:
    instance = PostfixInstance(
        root=deployment_root / "postfix",
        smtp_port=free_port(),
        milter=f"unix:{deployment.milter_dir / 'milter.sock'}",
        local_domain="local.test",
    )
    instance.start()
    yield instance
    instance.stop()


def whitelisted(server: PopauthServer, address: str) -> bool:
    return server.ask(f"QUERY {address}")[0].startswith("OK")


def test_a_real_login_relays_through_the_documented_deployment(
    deployment: Deployment,
    rsyslog: StockRsyslog,
    solid_pop3d: Callable[[str], bool],
    postfix: PostfixInstance,
) -> None:
    server = deployment.serve()
    follower = deployment.follower(server)
    try:
        follower.start()
        assert rcpt_reply(postfix.smtp_port, "127.0.0.61", REMOTE)[0] == 550
        # A local user's forgery, and Postfix's own unannotated chroot socket.
        forged = subprocess.run(
            [
                *("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "logger"),
                *("-u", str(rsyslog.socket_path), "-p", "local0.notice", "-t", "solid-pop3d"),
                "user alice authenticated - 203.0.113.9",
            ],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        assert forged.returncode == 0, forged.stderr
        rsyslog.send(
            "postfix/smtpd[77]", "connect from unknown[192.0.2.1]", path=rsyslog.postfix_socket_path
        )
        assert solid_pop3d("127.0.0.61")
        wait_until(
            lambda: whitelisted(server, "127.0.0.61"),
            15,
            lambda: f"not whitelisted:\n{follower.output()}\n{rsyslog.text()[-2000:]}",
        )
        assert rcpt_reply(postfix.smtp_port, "127.0.0.61", REMOTE)[0] == 250
        assert not whitelisted(server, "203.0.113.9")
        (refused,) = follower.events("follow_refused")
        assert (refused["reason"], refused["sender_uid"]) == ("untrusted_sender", 65534)
        assert follower.events("follow_no_sender") == []
    finally:
        assert follower.stop() == 0, follower.output()
        server.stop()
    # The position, in the unit's StateDirectory, the follower's own.
    state = deployment.follow_state_dir / "follow.json"
    follow_uid = int(deployment.users.entry("popauth-follow")[2])
    assert state.stat().st_uid == follow_uid
    assert json.loads(state.read_text())["path"] == DEPLOYMENT["follow_log"]
    # The log rsyslog made: root:adm 0640, read by the unit's group adm.
    status = rsyslog.log_path.stat()
    assert (status.st_uid, status.st_gid, status.st_mode & 0o777) == (0, 4, 0o640)


def exit_message(follower: FollowerProcess) -> tuple[int, str]:
    assert follower.process is not None
    status = follower.process.wait(30)
    follower.process = None
    lines = [line for line in follower.output().splitlines() if line.startswith("popauth:")]
    return status, "\n".join(lines)


def test_popauths_own_state_directory_is_named_when_it_refuses_the_follower(
    deployment: Deployment,
) -> None:
    """The old default, /var/lib/popauth/follow.json: popauth's 0700 directory."""
    server = deployment.serve()
    follower = deployment.follower(server, follow_state_path="/var/lib/popauth/follow.json")
    try:
        with pytest.raises(PopauthProcessError, match="exited"):
            follower.start()
        status, message = exit_message(follower)
    finally:
        server.stop()
    assert status == 2, follower.output()
    assert message == (
        "popauth: cannot follow: follow_state_path /var/lib/popauth/follow.json: "
        "cannot read: Permission denied"
    )


def test_a_socket_that_shuts_the_follower_out_stops_it_naming_the_socket(
    deployment: Deployment,
) -> None:
    """Without ingest_socket_acl_groups the socket is popauth:dovecot 0660."""
    server = deployment.serve(ingest_socket_acl_groups=[])
    follower = deployment.follower(server)
    try:
        follower.start()
        status, message = exit_message(follower)
    finally:
        server.stop()
    assert status == 2, follower.output()
    assert message.startswith(
        "popauth: follow stopped: cannot connect to the ingest socket "
        "/run/popauth/ingest.sock: Permission denied"
    ), message


def test_the_follow_unit_verifies(tmp_path: Path) -> None:
    """systemd-analyze only warns about unknown keys: any output is a failure."""
    assert verify_unit(FOLLOW_UNIT, tmp_path) == (0, "")
