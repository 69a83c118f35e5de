"""A private, throw-away Postfix instance for live tests.

Everything lives under one root directory::

    ROOT/etc/            config_directory (main.cf, master.cf)
    ROOT/spool/          queue_directory (created by ``postfix start``)
    ROOT/data/           data_directory (must be owned by ``postfix``)
    ROOT/postfix.log     maillog_file (written by the ``postlog`` service)
    ROOT/popauth-relay.cidr

Nothing leaves the machine: every delivery transport (``smtp``, ``relay``,
``local``, ``virtual``, ``lmtp``) is a master.cf service that runs the
``discard`` daemon. They keep their usual names so that a milter's
``{rcpt_mailer}`` macro shows realistic values.

Milter sockets: smtpd runs as user ``postfix`` and connects to the milter
itself, so a UNIX milter socket must be connectable by ``postfix`` (socket
mode, e.g. 0666 or group ``postfix``) and every directory on its path must
be traversable by ``postfix`` (see ``ports.grant_traversal``). pytest's
temporary directories are 0700 root and are not.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shlex
import subprocess
import time
from pathlib import Path

from harness.daemon import DaemonError, ForegroundDaemon
from harness.ports import log_tail, pid_alive, read_banner, read_log, wait_pid_gone

START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0

DEFAULT_CONNECT_MACROS = "j {daemon_name} {daemon_addr} v _"

# name, type, private, wakeup, maxproc, command (unpriv "-" and chroot "n" everywhere).
_INTERNAL_SERVICES: tuple[tuple[str, str, str, str, str, str], ...] = (
    ("pickup", "unix", "n", "60", "1", "pickup"),
    ("cleanup", "unix", "n", "-", "0", "cleanup"),
    ("qmgr", "unix", "n", "300", "1", "qmgr"),
    ("rewrite", "unix", "-", "-", "-", "trivial-rewrite"),
    ("bounce", "unix", "-", "-", "0", "bounce"),
    ("defer", "unix", "-", "-", "0", "bounce"),
    ("trace", "unix", "-", "-", "0", "bounce"),
    ("verify", "unix", "-", "-", "1", "verify"),
    ("flush", "unix", "n", "1000?", "0", "flush"),
    ("proxymap", "unix", "-", "-", "-", "proxymap"),
    ("proxywrite", "unix", "-", "-", "1", "proxymap"),
    ("showq", "unix", "n", "-", "-", "showq"),
    ("error", "unix", "-", "-", "-", "error"),
    ("retry", "unix", "-", "-", "-", "error"),
    ("discard", "unix", "-", "-", "-", "discard"),
    ("anvil", "unix", "-", "-", "1", "anvil"),
    ("scache", "unix", "-", "-", "1", "scache"),
    # Delivery transports: all discard, named as the real ones.
    ("smtp", "unix", "-", "-", "-", "discard"),
    ("relay", "unix", "-", "-", "-", "discard"),
    ("local", "unix", "-", "-", "-", "discard"),
    ("virtual", "unix", "-", "-", "-", "discard"),
    ("lmtp", "unix", "-", "-", "-", "discard"),
)


class PostfixError(DaemonError):
    """Postfix failed to start or stop; the message carries the log tail."""


class PostfixInstance(ForegroundDaemon):
    """Run a private Postfix (``postfix -c ROOT/etc``) listening on 127.0.0.1.

    ``root`` must be a fresh directory owned by this instance. ``milter`` is a
    milter spec (``unix:/path/sock``) put in ``smtpd_milters`` with
    ``milter_default_action = tempfail``; the socket and every directory above
    it must be accessible to user ``postfix``. ``sasl_path`` (relative to the
    queue directory, e.g. ``private/auth``) enables Dovecot SASL. By default
    ``smtpd_relay_restrictions`` lets every client through to the milter
    (``check_client_access cidr:`` answering OK) before
    ``reject_unauth_destination``: the milter decides relaying.
    """

    def __init__(
        self,
        *,
        root: Path,
        smtp_port: int,
        milter: str | None,
        local_domain: str = "local.test",
        sasl_path: str | None = None,
        relay_restrictions: str | None = None,
        extra_main_cf: dict[str, str] | None = None,
        service_commands: dict[str, str] | None = None,
        listen: str = "127.0.0.1",
    ) -> None:
        self.root = root.resolve()  # postfix -c silently ignores relative dirs
        # The addresses smtpd listens on, comma-separated; IPv6 ones only
        # inside a test's own network namespace (tests.live.netns).
        self.listen = listen
        self.smtp_port = smtp_port
        self.milter = milter
        self.local_domain = local_domain
        self.sasl_path = sasl_path
        self.relay_restrictions = relay_restrictions
        self.extra_main_cf = dict(extra_main_cf or {})
        # master.cf: another command for a service (e.g. {"lmtp": "lmtp"}, a
        # real LMTP client instead of discard), or a new unix service.
        self.service_commands = dict(service_commands or {})

    # -- layout --------------------------------------------------------------

    @property
    def config_dir(self) -> Path:
        return self.root / "etc"

    @property
    def queue_dir(self) -> Path:
        return self.root / "spool"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        return self.root / "postfix.log"

    @property
    def cidr_file(self) -> Path:
        return self.root / "popauth-relay.cidr"

    def log_text(self) -> str:
        """The whole maillog_file so far ('' before the first line)."""
        return read_log(self.log_file)

    # -- configuration -------------------------------------------------------

    def main_cf(self) -> dict[str, str]:
        """The main.cf settings, in order (extra_main_cf wins)."""
        relay = self.relay_restrictions
        if relay is None:
            relay = f"check_client_access cidr:{self.cidr_file}, reject_unauth_destination"
        settings: dict[str, str] = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "maillog_file": str(self.log_file),
            # postlogd only opens files under these prefixes.
            "maillog_file_prefixes": str(self.root),
            "syslog_name": f"postfix-{self.smtp_port}",
            "myhostname": "mx.popauth.test",
            "mydomain": "popauth.test",
            "myorigin": "$myhostname",
            "mydestination": f"{self.local_domain}, localhost",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.1/32",
            "relay_domains": "",
            "smtpd_peername_lookup": "no",
            "smtpd_banner": "$myhostname ESMTP popauth-test",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "append_dot_mydomain": "no",
            "default_transport": "smtp",
            "relay_transport": "relay",
            "local_transport": "local",
            "virtual_transport": "virtual",
            "smtpd_relay_restrictions": relay,
            "smtpd_recipient_restrictions": "",
            "smtpd_tls_security_level": "none",
            "smtp_tls_security_level": "none",
        }
        if self.milter is not None:
            connect_macros = DEFAULT_CONNECT_MACROS
            if "{client_addr}" not in connect_macros.split():
                connect_macros += " {client_addr}"
            settings.update(
                {
                    "smtpd_milters": self.milter,
                    # As the contrib file says: Postfix's default differs
                    # between releases (3.10: shutdown, 421 at connect).
                    "milter_default_action": contrib_milter_default_action(),
                    "milter_connect_macros": connect_macros,
                }
            )
        if self.sasl_path is not None:
            settings.update(
                {
                    "smtpd_sasl_auth_enable": "yes",
                    "smtpd_sasl_type": "dovecot",
                    "smtpd_sasl_path": self.sasl_path,
                }
            )
        if ":" in self.listen:
            settings["inet_protocols"] = "all"
        settings.update(self.extra_main_cf)
        return settings

    def _listen_endpoints(self) -> list[str]:
        hosts = [address.strip() for address in self.listen.split(",")]
        return [f"[{h}]:{self.smtp_port}" if ":" in h else f"{h}:{self.smtp_port}" for h in hosts]

    def _listen_endpoint(self) -> str:
        return self._listen_endpoints()[0]

    @property
    def probe_host(self) -> str:
        """The first listen address: where readiness is checked."""
        return self.listen.split(",")[0].strip()

    def master_cf(self) -> str:
        """The whole master.cf: smtpd on 127.0.0.1:PORT, chroot n everywhere."""
        lines = [
            *(f"{endpoint} inet n - n - - smtpd" for endpoint in self._listen_endpoints()),
            "postlog unix-dgram n - n - 1 postlogd",
        ]
        known = set()
        for name, kind, private, wakeup, maxproc, default in _INTERNAL_SERVICES:
            known.add(name)
            command = self.service_commands.get(name, default)
            lines.append(f"{name} {kind} {private} - n {wakeup} {maxproc} {command}")
        for name, command in self.service_commands.items():
            if name not in known:
                lines.append(f"{name} unix - - n - - {command}")
        return "\n".join(lines) + "\n"

    def _write_config(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_dir.mkdir(exist_ok=True)
        self.queue_dir.mkdir(exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        os.chown(self.data_dir, pwd.getpwnam("postfix").pw_uid, grp.getgrnam("postfix").gr_gid)
        os.chmod(self.data_dir, 0o700)
        # cidr tables accept both families even with inet_protocols = ipv4.
        self.cidr_file.write_text("0.0.0.0/0 OK\n::/0 OK\n", encoding="ascii")
        main = "".join(f"{key} = {value}\n" for key, value in self.main_cf().items())
        (self.config_dir / "main.cf").write_text(main, encoding="utf-8")
        (self.config_dir / "master.cf").write_text(self.master_cf(), encoding="utf-8")
        # Postfix re-reads main.cf in 300 ms steps (up to ~2 s) while its mtime
        # is not yet in the past ("file being modified"): backdate our files.
        past = time.time() - 10
        for path in (self.config_dir / "main.cf", self.config_dir / "master.cf", self.cidr_file):
            os.utime(path, (past, past))

    # -- lifecycle -----------------------------------------------------------

    def _postfix(self, action: str) -> subprocess.CompletedProcess[str]:
        """Run ``postfix -c DIR ACTION`` under script(1).

        The postfix command writes its errors to the terminal only (otherwise to
        syslog, which we do not have); ``script`` gives it a pty to write to.
        """
        command = shlex.join(["postfix", "-c", str(self.config_dir), action])
        return subprocess.run(
            ["script", "-qec", command, "/dev/null"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            check=False,
        )

    def _master_pid(self) -> int | None:
        try:
            text = (self.queue_dir / "pid" / "master.pid").read_text(encoding="ascii")
        except FileNotFoundError:
            return None
        try:
            return int(text.split()[0])
        except (IndexError, ValueError):
            return None

    def prepare(self) -> None:
        """Write the configuration and create the queue directories, unstarted.

        ``postfix check`` runs ``post-install create-missing``. Call this before
        starting a SASL server whose socket lives in ``queue_dir/private``
        (Dovecot's ``auth_socket_for_postfix``), then start(): with
        ``sasl_path`` set, smtpd exits at the first connection if the socket is
        missing ("fatal: no SASL authentication mechanisms") and master then
        throttles smtpd for 60 s. start() prepares again: the same files.
        """
        self._write_config()
        result = self._postfix("check")
        if result.returncode != 0:
            raise PostfixError(f"postfix check failed ({result.returncode}):\n{result.stdout}")

    # Postfix runs as ``postfix start-fg``: the master stays in the foreground,
    # a child of the postfix-script, in our session. ``postfix reload`` and
    # the like still reach it through its pid file.

    def command(self) -> list[str]:
        return ["postfix", "-c", str(self.config_dir), "start-fg"]

    @property
    def output_path(self) -> Path:
        return self.root / "postfix.out"

    def ready(self) -> bool:
        """A 220 banner; gives up at once when master throttles smtpd (a fatal smtpd error)."""
        if "-- throttling" in self.log_text():
            raise PostfixError(f"postfix throttles smtpd:\n{self.diagnostics()}")
        banner = read_banner(self.probe_host, self.smtp_port, timeout=0.5)
        return banner is not None and banner.startswith(b"220")

    def diagnostics(self) -> str:
        return (
            f"on {self._listen_endpoint()}:\n{log_tail(self.output_path)}\n"
            f"--- {self.log_file} ---\n{log_tail(self.log_file)}"
        )

    def terminate(self, process: subprocess.Popen[bytes]) -> None:
        """``postfix stop`` (SIGTERM to the master, which stops its children); wait for it."""
        pid = self._master_pid()
        if pid is not None and pid_alive(pid):
            self._postfix("stop")
            if not wait_pid_gone(pid, time.monotonic() + self.stop_timeout):
                raise PostfixError(f"postfix master {pid} still alive after stop")
        super().terminate(process)


# The contrib examples (milter door, socketmap door), and the socket path written in them.
MILTER_MAIN_CF = Path(__file__).parents[1] / "contrib" / "postfix" / "main.cf"
SOCKETMAP_MAIN_CF = Path(__file__).parents[1] / "contrib" / "postfix" / "socketmap-main.cf"
PRODUCTION_SOCKETMAP = "/var/spool/postfix/popauth/socketmap.sock"
POLICY_MAIN_CF = Path(__file__).parents[1] / "contrib" / "postfix" / "policy-main.cf"
PRODUCTION_POLICY = "unix:popauth/policy.sock"


def contrib_milter_default_action() -> str:
    """milter_default_action as contrib/postfix/main.cf sets it."""
    match = re.search(r"^milter_default_action = (\S+)$", MILTER_MAIN_CF.read_text(), re.M)
    assert match, f"no milter_default_action in {MILTER_MAIN_CF}"
    return match.group(1)


def contrib_relay_restrictions(socket_path: Path) -> str:
    """smtpd_relay_restrictions from the contrib file, with the test socket."""
    return _contrib_restrictions(SOCKETMAP_MAIN_CF, PRODUCTION_SOCKETMAP, str(socket_path))


def contrib_policy_relay_restrictions(socket_path: Path) -> str:
    """smtpd_relay_restrictions from the policy door's contrib file, with the test socket."""
    return _contrib_restrictions(POLICY_MAIN_CF, PRODUCTION_POLICY, f"unix:{socket_path}")


def _contrib_restrictions(contrib: Path, production: str, test: str) -> str:
    text = contrib.read_text()
    match = re.search(r"^smtpd_relay_restrictions =\n((?:[ \t]+\S.*\n)+)", text, re.M)
    assert match, f"no smtpd_relay_restrictions in {contrib}"
    value = " ".join(line.strip() for line in match.group(1).splitlines())
    assert production in value
    return value.replace(production, test)
