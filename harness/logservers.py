"""Private POP3 servers that only log through syslog, and a private rsyslog for them.

The servers (popa3d, solid-pop3d, Courier, Cyrus) provide ``pop3-server``
and so conflict with Dovecot's package; rsyslog would start a system
logger. So their .debs are unpacked into a private root (``dpkg -x``, as
for Sendmail), and their libraries are installed by ``scripts/bootstrap``.

Each server runs in a private mount namespace (``unshare -m``) where

- ``/dev`` is a fresh tmpfs with ``null``/``zero``/``urandom`` and a
  ``/dev/log`` that points at the private rsyslog's socket, so the server's
  syslog() reaches that rsyslog and nothing else;
- ``/etc/passwd``, ``/etc/shadow``, ``/etc/pam.d`` and ``/var/mail`` are the
  test's own: the mail users exist only there, PAM checks their passwords
  with pam_unix against the private shadow file.

The rsyslog listens on that socket with imuxsock's trusted properties and
writes the follower's log with the template of
``contrib/rsyslog/popauth-follow.conf``: the sender's uid and pid as the
kernel reported them.
"""

from __future__ import annotations

import abc
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

from harness.daemon import DaemonError, ForegroundDaemon
from harness.debs import unpacked_root
from harness.ports import grant_traversal, read_banner, read_log

REPO = Path(__file__).resolve().parents[1]
CONTRIB_RSYSLOG = REPO / "contrib" / "rsyslog" / "popauth-follow.conf"
ACCEPTOR = Path(__file__).with_name("inetd_acceptor.py")
POP3_CLIENT = Path(__file__).with_name("pop3_client.py")
PACKAGES = ("rsyslog", "popa3d", "solid-pop3d", "courier-pop", "cyrus-pop3d")
CACHE_DIR = Path(os.environ.get("POPAUTH_LOGSERVERS_CACHE", REPO / ".cache" / "logservers"))
RSYSLOG_MODULES = Path("usr/lib/x86_64-linux-gnu/rsyslog")
MAIL_UID = 64_101  # the private users' uids: unused on the host
START_TIMEOUT = 20.0


class LogServerError(DaemonError):
    """A private server or rsyslog could not be fetched or started."""


def _run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )


def ensure_package_root(destination: Path, cache_dir: Path = CACHE_DIR) -> Path:
    """Download the server packages once (into ``cache_dir``) and unpack them
    into ``destination``; return that private root.

    The root is unpacked outside the checkout because the servers drop
    privileges before they exec their helpers, and a checkout may sit in a
    directory only its owner can enter (root's home, ``mktemp -d``).
    """
    return unpacked_root(PACKAGES, cache_dir, destination)


def rsyslog_template() -> str:
    """The ``template(...)`` statement of the contrib file, for the private rsyslog."""
    text = CONTRIB_RSYSLOG.read_text()
    start = text.index("template(")
    return text[start : text.index(")\n", start) + 2]


class SyslogSink(ForegroundDaemon):
    """An rsyslog under test: a /dev/log socket, and the text it has written.

    Ready once the socket exists and a message sent to it has been written.
    """

    socket_path: Path
    name = "rsyslogd"
    error = LogServerError
    start_timeout = START_TIMEOUT

    def ready(self) -> bool:
        if not self.socket_path.exists():
            return False
        self.socket_path.chmod(0o666)  # every local user may log, as with /dev/log
        self.sync()
        return True

    def send(self, tag: str, message: str, *, path: Path | None = None) -> None:
        """One mail.info message to /dev/log (or ``path``), from this process (root)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.sendto(f"<22>{tag}: {message}".encode(), str(path or self.socket_path))

    def sync(self, timeout: float = 10.0) -> None:
        """Log a marker and wait until rsyslog has written it: what came before is written."""
        marker = f"sync-{uuid.uuid4().hex}"
        self.send("popauth-test", marker)
        deadline = time.monotonic() + timeout
        while marker not in self.text():
            if time.monotonic() > deadline:
                raise LogServerError(f"rsyslog did not write {marker}:\n{self.diagnostics()}")
            time.sleep(0.01)

    @abc.abstractmethod
    def text(self) -> str: ...

    @abc.abstractmethod
    def diagnostics(self) -> str: ...


class PrivateRsyslog(SyslogSink):
    """rsyslogd -n with one imuxsock socket (trusted properties) and one output file."""

    def __init__(self, root: Path, package_root: Path, prefix: tuple[str, ...] = ()) -> None:
        self.root = root
        self.package_root = package_root
        # A command prefix, e.g. nsenter into the PID namespace of the servers
        # it logs for, so that the pids it records are theirs.
        self.prefix = prefix
        self.socket_path = root / "log.sock"
        self.log_path = root / "logins.log"
        self.pid_path = root / "rsyslogd.pid"

    def config(self) -> str:
        modules = self.package_root / RSYSLOG_MODULES
        return (
            f'global(workDirectory="{self.root}")\n'
            f'module(load="{modules}/imuxsock.so" SysSock.Use="off")\n'
            f'input(type="imuxsock" Socket="{self.socket_path}" Annotate="on" ParseTrusted="on")\n'
            f"{rsyslog_template()}"
            f'*.* action(type="omfile" file="{self.log_path}" template="popauth-follow" '
            'fileCreateMode="0640")\n'
        )

    @property
    def output_path(self) -> Path:
        return self.root / "rsyslogd.out"

    def prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        grant_traversal(self.root)
        (self.root / "rsyslog.conf").write_text(self.config())

    def command(self) -> list[str]:
        return [
            *self.prefix,
            str(self.package_root / "usr/sbin/rsyslogd"),
            "-n",
            "-f",
            str(self.root / "rsyslog.conf"),
            "-i",
            str(self.pid_path),
            "-M",
            str(self.package_root / RSYSLOG_MODULES),
        ]

    def text(self) -> str:
        texts = []
        for path in sorted(self.root.glob("logins.log*")):
            texts.append(path.read_text(errors="replace"))
        return "".join(texts)

    def reopen(self) -> None:
        """What logrotate's postrotate does: HUP, rsyslog reopens its files."""
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

    def diagnostics(self) -> str:
        return read_log(self.output_path)


def _hash(password: str) -> str:
    result = _run(["openssl", "passwd", "-6", password])
    if result.returncode != 0:
        raise LogServerError(f"openssl passwd failed: {result.stderr}")
    return result.stdout.strip()


class Jail:
    """A private mount namespace: own /dev (with /dev/log), users, PAM and /var/mail."""

    def __init__(
        self,
        root: Path,
        log_socket: Path,
        users: dict[str, str],
        system_users: tuple[str, ...] = (),
        extra_mounts: tuple[str, ...] = (),
    ) -> None:
        self.root = root
        self.log_socket = log_socket
        self.users = users
        # Accounts a server drops privileges to (its package's postinst makes them).
        self.system_users = system_users
        # More shell lines for the namespace, run after the standard mounts.
        self.extra_mounts = extra_mounts

    def prepare(self, pam_services: tuple[str, ...]) -> None:
        etc = self.root / "etc"
        (etc / "pam.d").mkdir(parents=True, exist_ok=True)
        mail = self.root / "mail"
        mail.mkdir(exist_ok=True)
        mail.chmod(0o1777)
        passwd = Path("/etc/passwd").read_text()
        shadow = Path("/etc/shadow").read_text()
        for number, user in enumerate(self.system_users, start=50):
            uid = MAIL_UID + number
            passwd += f"{user}:x:{uid}:{uid}::/nonexistent:/usr/sbin/nologin\n"
            shadow += f"{user}:*:19000:0:99999:7:::\n"
        for number, (user, password) in enumerate(self.users.items()):
            uid = MAIL_UID + number
            # A home of its own with a Maildir (Courier reads a sticky or
            # shared home as a locked account); mbox servers use /var/mail.
            home = self.root / "home" / user
            for part in ("", "Maildir", "Maildir/cur", "Maildir/new", "Maildir/tmp"):
                (home / part).mkdir(parents=True, exist_ok=True)
                os.chown(home / part, uid, uid)
            home.chmod(0o700)
            passwd += f"{user}:x:{uid}:{uid}::{home}:/usr/sbin/nologin\n"
            shadow += f"{user}:{_hash(password)}:19000:0:99999:7:::\n"
            mailbox = mail / user
            mailbox.write_text("")
            os.chown(mailbox, uid, uid)
            mailbox.chmod(0o600)
        (etc / "passwd").write_text(passwd)
        (etc / "shadow").write_text(shadow)
        (etc / "shadow").chmod(0o640)
        for service in pam_services:
            (etc / "pam.d" / service).write_text(
                "auth required pam_unix.so nodelay\naccount required pam_permit.so\n"
                "session required pam_permit.so\n"
            )
        (etc / "pam.d" / "other").write_text("auth required pam_deny.so\n")

    def command(self, argv: list[str]) -> list[str]:
        etc = self.root / "etc"
        prelude = "; ".join(
            [
                "set -e",
                "mount -t tmpfs -o mode=755 tmpfs /dev",
                "mknod -m 666 /dev/null c 1 3",
                "mknod -m 666 /dev/zero c 1 5",
                "mknod -m 666 /dev/random c 1 8",
                "mknod -m 666 /dev/urandom c 1 9",
                f"ln -s {self.log_socket} /dev/log",
                f"mount --bind {etc / 'passwd'} /etc/passwd",
                f"mount --bind {etc / 'shadow'} /etc/shadow",
                f"mount --bind {etc / 'pam.d'} /etc/pam.d",
                f"mount --bind {self.root / 'mail'} /var/mail",
                *self.extra_mounts,
                'exec "$@"',
            ]
        )
        return ["unshare", "-m", "--propagation", "private", "sh", "-c", prelude, "jail", *argv]


class InetdServer(ForegroundDaemon):
    """A POP3 server inside a Jail on 127.0.0.1:port: run per connection (as from
    inetd), or, with ``inetd=False``, a daemon that listens itself."""

    name = "the POP3 server"
    error = LogServerError
    start_timeout = START_TIMEOUT

    def __init__(self, jail: Jail, port: int, argv: list[str], *, inetd: bool = True) -> None:
        self.jail = jail
        self.port = port
        self.argv = argv
        self.inetd = inetd

    @property
    def output_path(self) -> Path:
        return self.jail.root / "inetd.out"

    def command(self) -> list[str]:
        argv = self.argv
        if self.inetd:
            argv = ["/usr/bin/python3", "-I", str(ACCEPTOR), str(self.port), "--", *argv]
        return self.jail.command(argv)

    def ready(self) -> bool:
        banner = read_banner("127.0.0.1", self.port, timeout=0.5)
        return banner is not None and banner.startswith(b"+OK")

    def diagnostics(self) -> str:
        return f"{self.argv[0]} on port {self.port}:\n{read_log(self.output_path)}"


COURIER_BIN = Path("usr/lib/courier/courier")
COURIERTCPD = Path("/usr/sbin/couriertcpd")  # courier-base


def couriertcpd_has_ident(couriertcpd: Path = COURIERTCPD) -> bool:
    """Whether couriertcpd knows IDENT lookups (Courier 1.0, Debian 12), and so the
    ``-noidentlookup`` that turns them off; 1.4 (Debian 13) dropped both and
    refuses the option."""
    return b"noidentlookup" in couriertcpd.read_bytes()


def courier_pop3d(jail: Jail, port: int, package_root: Path) -> InetdServer:
    """Courier's POP3 server as Debian's init script runs it, in the jail.

    authdaemond (PAM service ``pop3``) with its socket in a private
    /run/courier, and couriertcpd on 127.0.0.1:port running courierpop3login
    then courierpop3d; both log through courierlogger (root) to /dev/log.
    """
    run = jail.root / "run-courier"
    (run / "authdaemon").mkdir(parents=True, exist_ok=True)
    # As Debian's tmpfiles.d makes it (0750 courier:courier): only root and
    # the group may talk to authdaemond.
    (run / "authdaemon").chmod(0o750)
    jail.extra_mounts = (
        *jail.extra_mounts,
        "mkdir -p /run/courier",
        f"mount --bind {run} /run/courier",
    )
    programs = package_root / COURIER_BIN
    script = (
        "/usr/sbin/courierlogger -name=authdaemond /usr/lib/courier/courier-authlib/authdaemond &"
        " while [ ! -S /run/courier/authdaemon/socket ]; do sleep 0.02; done;"
        " exec /usr/sbin/courierlogger -name=courierpop3login /usr/sbin/couriertcpd"
        " -address=127.0.0.1 -maxprocs=40 -maxperip=40 -nodnslookup"
        f"{' -noidentlookup' if couriertcpd_has_ident() else ''}"
        f" {port} {programs}/courierpop3login {programs}/courierpop3d Maildir"
    )
    return InetdServer(jail, port, ["/bin/sh", "-c", script], inetd=False)


def cyrus_pop3d(jail: Jail, port: int, package_root: Path, users: dict[str, str]) -> InetdServer:
    """Cyrus's master running pop3d on 127.0.0.1:port, users in a private sasldb.

    Everything Cyrus writes lives under ``jail.root / "cyrus"``. master starts
    services as the ``cyrus`` user (cyrus-common), who must be able to
    execute pop3d: it is copied there from the unpacked package.
    """
    base = jail.root / "cyrus"
    cyrus = pwd.getpwnam("cyrus")
    for part in ("conf/db", "conf/proc", "conf/socket", "conf/lock", "spool", "sock", "bin"):
        (base / part).mkdir(parents=True, exist_ok=True)
    shutil.copy2(package_root / "usr/lib/cyrus/bin/pop3d", base / "bin" / "pop3d")
    sasldb = base / "sasldb2"
    for user, password in users.items():
        result = subprocess.run(
            ["saslpasswd2", "-p", "-c", "-f", str(sasldb), "-u", "", user],
            input=password,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise LogServerError(f"saslpasswd2 failed: {result.stderr}")
    config = base / "imapd.conf"
    config.write_text(
        f"configdirectory: {base / 'conf'}\n"
        f"partition-default: {base / 'spool'}\n"
        "sasl_pwcheck_method: auxprop\nsasl_auxprop_plugin: sasldb\n"
        f"sasl_sasldb_path: {sasldb}\n"
        "allowplaintext: yes\nsasl_mech_list: PLAIN LOGIN\n"
        f"idlesocket: {base / 'sock/idle'}\nnotifysocket: {base / 'sock/notify'}\n"
        f"lmtpsocket: {base / 'sock/lmtp'}\n"
        "syslog_prefix: cyrus\nautocreate_users: anyone\nautocreate_post: 1\n"
    )
    services = base / "cyrus.conf"
    services.write_text(
        f'START {{\n  recover cmd="ctl_cyrusdb -r -C {config}"\n}}\n'
        f'SERVICES {{\n  pop3 cmd="{base / "bin/pop3d"} -C {config}" '
        f'listen="127.0.0.1:{port}" prefork=0\n}}\n'
        "EVENTS {\n}\n"
    )
    for path in [base, *base.rglob("*")]:
        os.chown(path, cyrus.pw_uid, cyrus.pw_gid)
    argv = [
        "/usr/lib/cyrus/bin/master",
        "-C",
        str(config),
        "-M",
        str(services),
        "-p",
        str(base / "master.pid"),
    ]
    return InetdServer(jail, port, argv, inetd=False)


class NamespacedPopa3d:
    """popa3d in its standalone mode (``-D``, the mode that logs the client
    address), in a Jail with a network namespace of its own.

    popa3d -D listens on port 110 of every address; inside the namespace that
    is only its own loopback. Clients log in from inside it (nsenter), from
    127.0.0.x, and the follower whitelists that address, which the SMTP
    client then uses on the host's loopback.
    """

    PORT = 110

    def __init__(self, jail: Jail, package_root: Path) -> None:
        self.jail = jail
        self.package_root = package_root
        self.ns_dir = jail.root / "netns"
        self.netns = self.ns_dir / "net"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> NamespacedPopa3d:
        self.ns_dir.mkdir(parents=True, exist_ok=True)
        # unshare --net=FILE keeps the namespace on FILE; it must be on a
        # private mount.
        subprocess.run(["mount", "--bind", str(self.ns_dir), str(self.ns_dir)], check=True)
        subprocess.run(["mount", "--make-private", str(self.ns_dir)], check=True)
        self.netns.touch()
        unbound = os.stat(self.netns).st_ino
        self.jail.extra_mounts = (*self.jail.extra_mounts, "ip link set lo up")
        command = self.jail.command([str(self.package_root / "usr/sbin/popa3d"), "-D"])
        command.insert(1, f"--net={self.netns}")
        output = (self.jail.root / "popa3d.out").open("ab")
        self.process = subprocess.Popen(command, stdout=output, stderr=output)
        output.close()
        deadline = time.monotonic() + START_TIMEOUT
        while os.stat(self.netns).st_ino == unbound:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise LogServerError("popa3d's network namespace did not come up")
            time.sleep(0.01)
        return self

    def login(self, source_ip: str, user: str, password: str) -> bool:
        result = subprocess.run(
            [
                "nsenter",
                f"--net={self.netns}",
                "/usr/bin/python3",
                "-I",
                str(POP3_CLIENT),
                source_ip,
                str(self.PORT),
                user,
                password,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if result.returncode != 0:
            raise LogServerError(f"POP3 client in the namespace failed:\n{result.stderr}")
        return result.stdout.strip() == "ok"

    def stop(self) -> None:
        if self.process is None:
            return
        # Every process in this namespace, and only those: it is our own.
        inode = os.stat(self.netns).st_ino
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if os.stat(entry / "ns" / "net").st_ino == inode:
                        os.kill(int(entry.name), signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
        subprocess.run(["umount", str(self.netns)], check=False)
        subprocess.run(["umount", str(self.ns_dir)], check=False)


def unprivileged_user() -> str:
    """A local user with no rights over mail: the one who tries to inject log lines."""
    return pwd.getpwnam("nobody").pw_name
