"""A private, throw-away Dovecot (POP3, optionally IMAP) for live tests.

Layout under ``root``::

    ROOT/dovecot.conf
    ROOT/users           passwd-file (user:{PLAIN}password)
    ROOT/run/            base_dir (master.pid, login sockets)
    ROOT/state/          state_dir
    ROOT/mail/<user>/    homes, Maildir (owned by ``nobody``)
    ROOT/dovecot.log     log_path

Dovecot's processes drop privileges (``dovecot`` for auth and the post-login
hook, ``dovenull`` for login, ``nobody`` for mail), so ``root`` and all its
ancestors get o+x (``ports.grant_traversal``): pytest's tmp dirs are 0700.

The optional post-login hook runs through ``script-login`` as the internal
``dovecot`` user, gets ``USER``, ``IP`` and ``LOCAL_IP``, and must finish with
``exec "$@"``. ``hook_env`` cannot go through ``import_environment``:
script-login calls ``env_clean()`` before it execs the hook and then puts only
``USER``, ``IP``, ``LOCAL_IP``, ``USERDB_KEYS`` and the userdb fields (upper
case: ``UID``, ``GID``, ``HOME``, ``AUTH_MECH``...) into the environment. So the
hook runs through env(1)::

    executable = script-login /usr/bin/env KEY=VALUE ... /path/to/hook

script-login execs its first argument with the rest as arguments (plus its own
path, the ``"$@"`` the hook execs). The hook has no ``PATH``: it must use
absolute paths or set ``PATH`` itself.
"""

from __future__ import annotations

import contextlib
import functools
import imaplib
import os
import poplib
import pwd
import re
import signal
import socket
import subprocess
from pathlib import Path

from harness.daemon import DaemonError, ForegroundDaemon
from harness.ports import grant_traversal, log_tail, read_banner, read_log

MAIL_USER = "nobody"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_ENV_VALUE = re.compile(r"[^\s\"'\\#]*\Z")


class DovecotError(DaemonError):
    """Dovecot failed to start or stop; the message carries the log tail."""


@functools.cache
def dovecot_version() -> tuple[int, ...]:
    """The installed Dovecot's version from ``dovecot --version`` (``2.4.1-4 (7d8c0e5759)``)."""
    try:
        completed = subprocess.run(
            ["dovecot", "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except FileNotFoundError:
        raise DovecotError("dovecot is not installed: run scripts/bootstrap test") from None
    found = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", completed.stdout.strip())
    if completed.returncode != 0 or found is None:
        raise DovecotError(f"dovecot --version: {completed.stdout}{completed.stderr}")
    return tuple(int(part) for part in found.groups("0"))


class DovecotSyntax:
    """The settings whose syntax changed in Dovecot 2.4, for the installed version.

    2.4 refuses 2.3's names (and the reverse): every file it reads starts
    with ``dovecot_config_version``; ``%u`` became ``%{user}``; passdb and
    userdb blocks are named by their driver.
    """

    def __init__(self, version: tuple[int, ...]) -> None:
        self.version = version
        self.is_2_4 = version >= (2, 4)

    def preamble(self) -> list[str]:
        """The first lines of dovecot.conf."""
        if not self.is_2_4:
            return []
        version = ".".join(str(part) for part in self.version[:3])
        return [f"dovecot_config_version = {version}", f"dovecot_storage_version = {version}"]

    @property
    def user(self) -> str:
        return "%{user}" if self.is_2_4 else "%u"

    @property
    def user_name_lower(self) -> str:
        """The user name without ``@domain``, lower case (``%Ln`` in 2.3)."""
        return "%{user | username | lower}" if self.is_2_4 else "%Ln"

    @property
    def listener_address(self) -> str:
        """The address setting of an ``inet_listener`` (2.4: the global ``listen``)."""
        return "listen" if self.is_2_4 else "address"

    def allow_cleartext(self) -> str:
        return "auth_allow_cleartext = yes" if self.is_2_4 else "disable_plaintext_auth = no"

    def maildir(self, path: str) -> list[str]:
        """Mail in the Maildir at ``path`` (which may use :attr:`user`)."""
        if self.is_2_4:
            return ["mail_driver = maildir", f"mail_path = {path}"]
        return [f"mail_location = maildir:{path}"]

    def passwd_file(self, path: Path) -> list[str]:
        """A passwd-file passdb of ``{PLAIN}`` passwords keyed by the whole user name."""
        if self.is_2_4:
            return [
                "passdb passwd-file {",
                f"  passwd_file_path = {path}",
                "  default_password_scheme = PLAIN",
                "}",
            ]
        return [
            "passdb {",
            "  driver = passwd-file",
            f"  args = scheme=PLAIN username_format=%u {path}",
            "}",
        ]

    def static_userdb(self, uid: int, gid: int, home: str) -> list[str]:
        if self.is_2_4:
            return [
                "userdb static {",
                "  fields {",
                f"    uid = {uid}\n    gid = {gid}\n    home = {home}",
                "  }",
                "}",
            ]
        return [
            "userdb {",
            "  driver = static",
            f"  args = uid={uid} gid={gid} home={home}",
            "}",
        ]


def dovecot_syntax() -> DovecotSyntax:
    """The syntax of the installed Dovecot."""
    return DovecotSyntax(dovecot_version())


def _login_service(proto: str, port: int, listen: str, syntax: DovecotSyntax) -> list[str]:
    """``service pop3-login`` / ``imap-login``: plain port on ``listen``, no TLS port."""
    return [
        f"service {proto}-login {{",
        f"  inet_listener {proto} {{",
        f"    {syntax.listener_address} = {listen}",
        f"    port = {port}",
        "  }",
        f"  inet_listener {proto}s {{",
        "    port = 0",
        "  }",
        "}",
    ]


class DovecotInstance(ForegroundDaemon):
    """Run a private Dovecot (``dovecot -F -c ROOT/dovecot.conf``) on 127.0.0.1.

    ``users`` maps user names to passwd-file passwords (``{PLAIN}secret``).
    ``postlogin_hook`` is installed via script-login for pop3 (and imap when
    ``imap_port`` is set); ``hook_env`` values must not contain whitespace or
    quotes (they become words of the ``executable`` setting). ``auth_socket_for_postfix``
    (usually ``postfix.queue_dir / "private/auth"``) adds a SASL listener owned
    by ``postfix``. ``lmtp_socket`` adds Dovecot LMTP (dovecot-lmtpd) on that
    UNIX socket, delivering ``user@any.domain`` into ``ROOT/mail/user/Maildir``.
    """

    name = "dovecot"
    error = DovecotError
    stop_timeout = 20.0

    def __init__(
        self,
        *,
        root: Path,
        pop3_port: int,
        imap_port: int | None = None,
        users: dict[str, str],
        postlogin_hook: Path | None = None,
        hook_env: dict[str, str] | None = None,
        auth_socket_for_postfix: Path | None = None,
        lmtp_socket: Path | None = None,
        listen: str = "127.0.0.1",
    ) -> None:
        self.root = root.resolve()
        # Comma-separated; IPv6 addresses only inside a test's own network namespace.
        self.listen = listen
        self.pop3_port = pop3_port
        self.imap_port = imap_port
        self.users = dict(users)
        self.postlogin_hook = postlogin_hook
        self.hook_env = dict(hook_env or {})
        self.auth_socket_for_postfix = auth_socket_for_postfix
        self.lmtp_socket = lmtp_socket
        for name, value in self.hook_env.items():
            if not _ENV_NAME.match(name) or not _ENV_VALUE.match(value):
                raise ValueError(
                    f"hook_env entry not usable on the executable line: {name}={value!r}"
                )

    # -- layout --------------------------------------------------------------

    @property
    def config_file(self) -> Path:
        return self.root / "dovecot.conf"

    @property
    def base_dir(self) -> Path:
        return self.root / "run"

    @property
    def log_file(self) -> Path:
        return self.root / "dovecot.log"

    @property
    def stderr_file(self) -> Path:
        return self.root / "dovecot.stderr"

    def log_text(self) -> str:
        return read_log(self.log_file)

    # -- configuration -------------------------------------------------------

    def config(self) -> str:
        """The whole dovecot.conf."""
        protocols = "pop3 imap" if self.imap_port is not None else "pop3"
        if self.lmtp_socket is not None:
            protocols += " lmtp"
        mail = pwd.getpwnam(MAIL_USER)
        syntax = dovecot_syntax()
        mail_root = self.root / "mail"
        parts = [
            *syntax.preamble(),
            f"protocols = {protocols}",
            f"listen = {self.listen}",
            f"base_dir = {self.base_dir}",
            f"state_dir = {self.root / 'state'}",
            f"log_path = {self.log_file}",
            f"instance_name = dovecot-{self.pop3_port}",
            "ssl = no",
            syntax.allow_cleartext(),
            "auth_mechanisms = plain login",
            "auth_verbose = yes",
            "auth_failure_delay = 0",  # failed logins answer at once
            *syntax.maildir(f"{mail_root}/{syntax.user}/Maildir"),
            f"first_valid_uid = {mail.pw_uid}",
            f"last_valid_uid = {mail.pw_uid}",
            f"first_valid_gid = {mail.pw_gid}",
            f"last_valid_gid = {mail.pw_gid}",
            *syntax.passwd_file(self.root / "users"),
            *syntax.static_userdb(mail.pw_uid, mail.pw_gid, f"{mail_root}/{syntax.user}"),
            *_login_service("pop3", self.pop3_port, self.listen, syntax),
        ]
        if self.imap_port is not None:
            parts += _login_service("imap", self.imap_port, self.listen, syntax)
        if self.auth_socket_for_postfix is not None:
            parts += [
                "service auth {",
                f"  unix_listener {self.auth_socket_for_postfix} {{",
                "    mode = 0660\n    user = postfix\n    group = postfix",
                "  }",
                "}",
            ]
        if self.lmtp_socket is not None:
            # Postfix's lmtp client (user postfix) delivers user@domain here;
            # the passwd-file knows bare user names.
            parts += [
                "service lmtp {",
                f"  unix_listener {self.lmtp_socket} {{\n    mode = 0666\n  }}",
                "}",
                f"protocol lmtp {{\n  auth_username_format = {syntax.user_name_lower}\n}}",
            ]
        if self.postlogin_hook is not None:
            # script-login env_clean()s before exec'ing the hook, so
            # import_environment cannot reach it: run it through env(1).
            env_args = [f"{k}={v}" for k, v in self.hook_env.items()]
            hook_command = " ".join(
                (["/usr/bin/env", *env_args] if env_args else []) + [str(self.postlogin_hook)]
            )
            for proto in ["pop3"] + (["imap"] if self.imap_port is not None else []):
                parts += [
                    f"service {proto} {{\n  executable = {proto} {proto}-postlogin\n}}",
                    f"service {proto}-postlogin {{",
                    f"  executable = script-login {hook_command}",
                    # Dovecot's default_internal_user; the variable is spelt
                    # differently in 2.3 and 2.4, the name works in both.
                    "  user = dovecot",
                    f"  unix_listener {proto}-postlogin {{\n  }}",
                    "}",
                ]
        return "\n".join(parts) + "\n"

    def _write_config(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        grant_traversal(self.root)
        mail_root = self.root / "mail"
        mail_root.mkdir(exist_ok=True)
        mail = pwd.getpwnam(MAIL_USER)
        os.chown(mail_root, mail.pw_uid, mail.pw_gid)
        users = "".join(f"{user}:{password}\n" for user, password in self.users.items())
        users_file = self.root / "users"
        users_file.write_text(users, encoding="utf-8")
        os.chmod(users_file, 0o644)  # read by the auth process (user dovecot)
        self.config_file.write_text(self.config(), encoding="utf-8")

    def _master_pid(self) -> int | None:
        try:
            return int((self.base_dir / "master.pid").read_text(encoding="ascii").split()[0])
        except (FileNotFoundError, IndexError, ValueError):
            return None

    # -- lifecycle -----------------------------------------------------------
    #
    # Dovecot runs in the foreground (``-F``) as our child in a new session,
    # so a failed start shows up as an exit status, and stop() finds every
    # process of the instance by its process group. Its stdout and stderr go
    # to ``ROOT/dovecot.stderr``, not to a pipe: processes that outlive the
    # master would hold a pipe open. The master exits within about a second
    # of SIGTERM, but its auth, log, anvil and stats children linger while a
    # client (Postfix smtpd's SASL connection) stays connected to auth; the
    # base class ends them through the process group.

    def prepare(self) -> None:
        self._write_config()

    def command(self) -> list[str]:
        return ["dovecot", "-F", "-c", str(self.config_file)]

    @property
    def output_path(self) -> Path:
        return self.stderr_file

    def ready(self) -> bool:
        """The POP3 listener greets with ``+OK``."""
        banner = read_banner(self.listen.split(",")[0].strip(), self.pop3_port, timeout=0.5)
        return banner is not None and banner.startswith(b"+OK")

    def diagnostics(self) -> str:
        return (
            f"on {self.listen} port {self.pop3_port}:\n{log_tail(self.stderr_file)}\n"
            f"--- {self.log_file} ---\n{log_tail(self.log_file)}"
        )

    def terminate(self, process: subprocess.Popen[bytes]) -> None:
        """SIGTERM to the master (pid from ``base_dir/master.pid``)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._master_pid() or process.pid, signal.SIGTERM)


def pop3_login(
    port: int, user: str, password: str, source_ip: str = "127.0.0.1", server: str = "127.0.0.1"
) -> bool:
    """Log in over POP3 from ``source_ip``; True iff USER/PASS succeeded (then QUIT).

    poplib has no source_address parameter: bind through ``_create_socket``.
    """

    class _Bound(poplib.POP3):
        def _create_socket(self, timeout: float) -> socket.socket:
            return socket.create_connection(
                (self.host, self.port), timeout, source_address=(source_ip, 0)
            )

    client = _Bound(server, port, timeout=10)
    try:
        client.user(user)
        client.pass_(password)
    except poplib.error_proto:
        client.close()
        return False
    client.quit()
    return True


def imap_login(
    port: int, user: str, password: str, source_ip: str = "127.0.0.1", server: str = "127.0.0.1"
) -> bool:
    """Log in over IMAP from ``source_ip``; True iff LOGIN succeeded (then LOGOUT).

    imaplib has no source_address parameter either: same ``_create_socket`` override.
    """

    class _Bound(imaplib.IMAP4):
        def _create_socket(self, timeout: float | None) -> socket.socket:
            return socket.create_connection(
                (self.host, self.port), timeout, source_address=(source_ip, 0)
            )

    client = _Bound(server, port, timeout=10)
    try:
        client.login(user, password)
    except imaplib.IMAP4.error:
        client.shutdown()
        return False
    client.logout()
    return True


class ImapSession:
    """An IMAP session held open from ``source_ip`` (LOGIN on enter, LOGOUT on exit).

    What a client in IDLE looks like to Dovecot: logged in, connected, silent.
    """

    def __init__(self, port: int, user: str, password: str, source_ip: str) -> None:
        class _Bound(imaplib.IMAP4):
            def _create_socket(self, timeout: float | None) -> socket.socket:
                return socket.create_connection(
                    (self.host, self.port), timeout, source_address=(source_ip, 0)
                )

        self.client = _Bound("127.0.0.1", port, timeout=10)
        self._user = user
        self._password = password

    def __enter__(self) -> ImapSession:
        try:
            self.client.login(self._user, self._password)
        except imaplib.IMAP4.error:
            self.client.shutdown()
            raise
        return self

    def logout(self) -> None:
        if self.client.state != "LOGOUT":
            self.client.logout()

    def __exit__(self, *exc: object) -> None:
        self.logout()
