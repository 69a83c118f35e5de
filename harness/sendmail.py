"""Private, throwaway Sendmail instances for live tests.

Sendmail is not installed (the Debian package conflicts with postfix): its
packages are unpacked into a private root with ``dpkg -x`` and the daemon runs
from there, as root, in a private directory, delivering nothing
(``confDELIVERY_MODE=queueonly``).

The .cf is built from the product's own ``contrib/sendmail.mc``; a test only
wraps it::

    mc = wrap_contrib_mc(CONTRIB_MC.read_text(), workdir, port,
                         milter_socket="unix:/tmp/x/milter.sock",
                         local_domains="local.test")
    with SendmailInstance(root, workdir, port, mc) as mta:
        ...

``mc_test_prelude`` (placed before the contrib file) defines its POPAUTH_*
parameters; ``mc_test_postlude`` (placed after it) overrides Sendmail options
that must be private in a test (queue, pid file, status file, aliases, ...).
(Their names do not start with ``test`` so that pytest never collects them.)

Sendmail logs only to syslog, which nothing reads here; ``-X traffic.log``
records every SMTP line and start-up errors, and ``diagnostics()`` returns it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path

from harness.daemon import DaemonError, ForegroundDaemon
from harness.debs import unpacked_root

PACKAGES: tuple[str, ...] = ("sendmail-bin", "sendmail-cf", "sendmail-base")
SENDMAIL_BIN = Path("usr/libexec/sendmail/sendmail")
CF_DIR = Path("usr/share/sendmail/cf")
REPO = Path(__file__).resolve().parents[1]
CONTRIB_MC = REPO / "contrib" / "sendmail.mc"
# Where the live tests keep the downloaded .debs and the unpacked root
# (/.cache/ is in .gitignore); override with POPAUTH_SENDMAIL_CACHE.
DEFAULT_CACHE_DIR = Path(os.environ.get("POPAUTH_SENDMAIL_CACHE", REPO / ".cache" / "sendmail"))

# A directory on libsasl2's built-in config path (Debian 12) that exists.
SASL_CONF_DIR = "/usr/lib/sasl2"


class SendmailError(DaemonError):
    """Sendmail could not be fetched, configured or started."""


def ensure_sendmail_root(cache_dir: Path) -> Path:
    """The Sendmail packages downloaded once and unpacked under ``cache_dir``; the root."""
    return unpacked_root(PACKAGES, cache_dir, cache_dir / "root")


def build_cf(root: Path, mc_text: str, out: Path) -> Path:
    """Build a .cf from ``mc_text`` with the cf tree under ``root``."""
    cf_dir = root / CF_DIR
    mc_path = out.with_suffix(".mc")
    if mc_path == out:
        raise SendmailError(f"output {out} must not end in .mc")
    mc_path.write_text(mc_text)
    result = subprocess.run(
        ["m4", f"-D_CF_DIR_={cf_dir}/", str(cf_dir / "m4" / "cf.m4"), str(mc_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    # m4 prints warnings (e.g. FEATURE(promiscuous_relay)) on stderr and still
    # succeeds; only the exit status counts.
    if result.returncode != 0 or not result.stdout.strip():
        raise SendmailError(f"m4 failed ({result.returncode}) on {mc_path}:\n{result.stderr}")
    out.write_text(result.stdout)
    return out


def _q(value: str) -> str:
    """m4-quote a value for a define()."""
    return f"`{value}'"


def mc_test_prelude(
    smtp_port: int,
    *,
    milter_socket: str,
    local_domains: str = "local.test",
    milter_timeouts: str = "C:5s;S:5s;R:10s;E:30s",
    msa_port: int | None = None,
    features: str = "",
    listen: str = "127.0.0.1",
) -> str:
    """POPAUTH_* parameters for contrib/sendmail.mc; goes BEFORE it.

    ``features`` are extra .mc lines that must come before MAILER(), such as
    ``FEATURE(`virtusertable', ...)``.

    Without ``msa_port`` there is no submission listener (the production
    default would bind port 587 on every address).
    """
    family = "inet6" if ":" in listen else "inet"
    daemon = f"Port={smtp_port}, Addr={listen}, Family={family}, Name=MTA"
    msa = "" if msa_port is None else f"Port={msa_port}, Addr=127.0.0.1, Family=inet, Name=MSA, M=E"
    return "".join(
        [
            "divert(-1)dnl\n",
            f"define(`POPAUTH_MILTER_SOCKET', {_q(milter_socket)})\n",
            f"define(`POPAUTH_MILTER_TIMEOUTS', {_q(milter_timeouts)})\n",
            f"define(`POPAUTH_DAEMON_OPTIONS', {_q(_q(daemon))})\n",
            f"define(`POPAUTH_MSA_OPTIONS', {_q(_q(msa) if msa else '')})\n",
            f"define(`POPAUTH_LOCAL_DOMAINS', {_q(local_domains)})\n",
            "divert(0)dnl\n",
            # No DNS here: sender domains would get 553 5.1.8 "Domain of
            # sender address ... does not exist".  A FEATURE must come before
            # MAILER(), so it belongs in the prelude, not the postlude.
            "FEATURE(`accept_unresolvable_domains')dnl\n",
            features.rstrip("\n") + "\n" if features else "",
        ]
    )


def mc_test_postlude(workdir: Path, extra: str = "") -> str:
    """Test-only Sendmail options; goes AFTER the contrib file (last wins).

    Everything Sendmail would touch outside ``workdir`` is moved into it:
    queue, pid and status files, aliases, help file, class files, dead
    letters, host status.  Delivery is queue-only, so nothing leaves.
    """
    w = workdir
    lines = [
        "dnl ---- test-only overrides (harness/sendmail.py)",
        f"define(`QUEUE_DIR', {_q(str(w / 'mqueue'))})dnl",
        f"define(`confPID_FILE', {_q(str(w / 'sendmail.pid'))})dnl",
        f"define(`STATUS_FILE', {_q(str(w / 'sendmail.st'))})dnl",
        f"define(`ALIAS_FILE', {_q(str(w / 'aliases'))})dnl",
        f"define(`HELP_FILE', {_q(str(w / 'helpfile'))})dnl",
        f"define(`confCW_FILE', {_q('-o ' + str(w / 'local-host-names'))})dnl",
        f"define(`confCR_FILE', {_q('-o ' + str(w / 'relay-domains'))})dnl",
        f"define(`confCT_FILE', {_q('-o ' + str(w / 'trusted-users'))})dnl",
        f"define(`confDEAD_LETTER_DROP', {_q(str(w / 'dead.letter'))})dnl",
        f"define(`confHOST_STATUS_DIRECTORY', {_q(str(w / 'hoststat'))})dnl",
        "define(`confDELIVERY_MODE', `queueonly')dnl",
        "define(`confDONT_PROBE_INTERFACES', `True')dnl",
        "define(`confDEF_USER_ID', `mail:mail')dnl",
        # Paths under /tmp (world writable, sticky) are otherwise "unsafe":
        # Sendmail refuses to start when the milter socket or queue lies
        # below a world-writable directory.
        "define(`confDONT_BLAME_SENDMAIL', `TrustStickyBit')dnl",
        # No DNS on this machine: never wait for resolvers.
        "define(`confBIND_OPTS', `-DNSRCH -DEFNAMES')dnl",
        "define(`confTO_IDENT', `0s')dnl",
        "define(`confTO_RESOLVER_RETRANS', `1s')dnl",
        "define(`confTO_RESOLVER_RETRY', `1')dnl",
        "define(`confLOG_LEVEL', `14')dnl",
    ]
    if extra:
        lines.append(extra.rstrip("\n"))
    return "\n".join(lines) + "\n"


def wrap_contrib_mc(
    contrib_text: str,
    workdir: Path,
    smtp_port: int,
    *,
    milter_socket: str,
    local_domains: str = "local.test",
    msa_port: int | None = None,
    extra: str = "",
    features: str = "",
    listen: str = "127.0.0.1",
) -> str:
    """The contrib .mc with the test prelude before and postlude after it."""
    return (
        mc_test_prelude(
            smtp_port,
            milter_socket=milter_socket,
            local_domains=local_domains,
            msa_port=msa_port,
            features=features,
            listen=listen,
        )
        + contrib_text
        + ("" if contrib_text.endswith("\n") else "\n")
        + mc_test_postlude(workdir, extra)
    )


def make_sasl_dir(sasl_dir: Path, users: Mapping[str, str], realm: str = "mx.local.test") -> Path:
    """A private Cyrus SASL config for Sendmail: Sendmail.conf and a sasldb.

    Pass the directory as ``SendmailInstance(..., sasl_dir=...)``.  The realm
    must be Sendmail's AuthRealm, which defaults to its host name ($j).  The
    milter then sees ``{auth_authen}`` = the bare user name.
    """
    sasl_dir.mkdir(parents=True, exist_ok=True)
    sasl_dir.chmod(0o755)
    sasldb = sasl_dir / "sasldb2"
    (sasl_dir / "Sendmail.conf").write_text(
        "pwcheck_method: auxprop\n"
        "auxprop_plugin: sasldb\n"
        f"sasldb_path: {sasldb}\n"
        "mech_list: PLAIN LOGIN\n"
    )
    for user, password in users.items():
        result = subprocess.run(
            ["saslpasswd2", "-p", "-c", "-f", str(sasldb), "-u", realm, user],
            input=password,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise SendmailError(f"saslpasswd2 failed for {user}:\n{result.stderr}")
    return sasl_dir


def _banner(port: int, timeout: float, host: str = "127.0.0.1") -> bytes:
    with socket.create_connection((host, port), timeout=timeout) as conn:
        conn.settimeout(timeout)
        data = b""
        while b"\n" not in data:
            chunk = conn.recv(1024)
            if not chunk:
                break
            data += chunk
        with contextlib.suppress(OSError):
            conn.sendall(b"QUIT\r\n")
        return data


class SendmailInstance(ForegroundDaemon):
    """A foreground Sendmail daemon (``-bD``) in a private directory.

    It leads its own session: stopping it signals the whole group, so that
    SMTP children still running go too.
    """

    name = "sendmail"
    error = SendmailError

    def __init__(
        self,
        root: Path,
        workdir: Path,
        smtp_port: int,
        mc_text: str,
        *,
        hostname: str = "mx.local.test",
        start_timeout: float = 20.0,
        sasl_dir: Path | None = None,
        listen: str = "127.0.0.1",
    ) -> None:
        self.root = root
        # The address in the .mc's DAEMON_OPTIONS; where readiness is checked.
        self.listen = listen
        self.workdir = workdir
        self.smtp_port = smtp_port
        self.mc_text = mc_text
        self.hostname = hostname
        self.start_timeout = start_timeout
        self.sasl_dir = sasl_dir
        self.cf_path = workdir / "sendmail.cf"
        self.traffic_path = workdir / "traffic.log"
        self.banner = ""

    def prepare(self) -> None:
        """Create the private directories and files and build the .cf."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        for sub in ("mqueue", "hoststat"):
            path = self.workdir / sub
            path.mkdir(exist_ok=True)
            path.chmod(0o700)
        aliases = self.workdir / "aliases"
        if not aliases.exists():
            aliases.write_text("postmaster: root\nMAILER-DAEMON: postmaster\n")
        build_cf(self.root, self.mc_text, self.cf_path)

    def command(self) -> list[str]:
        """The argv: sendmail -bD under a private UTS (and mount) namespace."""
        sendmail = self.root / SENDMAIL_BIN
        inner = 'hostname "$1" && exec "$2" -bD -C "$3" -X "$4"'
        unshare = ["unshare", "--uts"]
        if self.sasl_dir is not None:
            # libsasl2 reads Sendmail.conf from its fixed config path, and
            # Sendmail ignores SASL_CONF_PATH; a private mount namespace
            # (propagation private, the unshare default) puts our directory
            # over /usr/lib/sasl2 for this process only.
            unshare.append("--mount")
            inner = f'mount --bind "$5" {SASL_CONF_DIR} && {inner}'
        argv = [
            *unshare,
            "sh",
            "-c",
            inner,
            "sh",
            self.hostname,
            str(sendmail),
            str(self.cf_path),
            str(self.traffic_path),
        ]
        if self.sasl_dir is not None:
            argv.append(str(self.sasl_dir))
        return argv

    @property
    def output_path(self) -> Path:
        return self.workdir / "sendmail.out"

    def working_directory(self) -> Path:
        return self.workdir

    def ready(self) -> bool:
        """A 220 banner on the listen address (kept in :attr:`banner`)."""
        try:
            banner = _banner(self.smtp_port, timeout=2.0, host=self.listen)
        except OSError:
            return False
        if not banner.startswith(b"220"):
            return False
        self.banner = banner.decode("ascii", "replace").strip()
        return True

    def diagnostics(self) -> str:
        parts = [f"on {self.listen} port {self.smtp_port}"]
        for path in (self.output_path, self.traffic_path):
            if path.exists():
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')}")
        return "\n".join(parts)
