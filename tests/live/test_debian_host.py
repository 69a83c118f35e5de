"""The Debian package on a real Debian host, as Debian's autopkgtest would run it.

For Debian 12 and 13: a fresh root boots with systemd as PID 1
(tests/live/debian_host.py), gets Debian's Postfix ("Internet Site") and
Dovecot, then the README's install commands exactly as README.rst has them
(the .deb built by its ``make deb``), and the checks go through the real
units: POP3 and IMAP logins through Dovecot's hook, relaying through
Postfix's smtpd and the milter, SMTP AUTH through Dovecot's SASL listener,
stop, restart, reload, the sandbox as systemd applies it, the journal, the
manual page, and a purge that leaves nothing behind.

The clients are other machines' addresses (192.0.2.x on the host's own
loopback): every 127.x client is in popauth's default trusted_networks.
"""

from __future__ import annotations

import imaplib
import poplib
import re
import smtplib
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.live.debian_host import HOSTNAME, REPO, DebianHost

# Each boots its own Debian host; test-debian13 leaves them to the machine's run.
pytestmark = [pytest.mark.live, pytest.mark.debian_hosts]

LOCAL = f"alice@{HOSTNAME}"
REMOTE = "someone@remote.example"
PASSWORD = "wonderland"
POP_CLIENT, STRANGER = "192.0.2.10", "192.0.2.20"
AUTH_CLIENT, IMAP_CLIENT = "192.0.2.30", "192.0.2.40"
MAIL_HOST = ("postfix", "dovecot-pop3d", "dovecot-imapd")
# The test's own short ttl, in a unit drop-in (the packaged popauth.toml stays as shipped).
TEST_TTL = 6


def readme_install_commands() -> list[str]:
    """The commands of README.rst's "Install on Debian" block, as pasted."""
    text = (REPO / "README.rst").read_text(encoding="utf-8")
    section = text.split("Install on Debian\n=================\n", 1)[1]
    block = section.split("::\n\n", 1)[1]
    commands = []
    for line in block.split("\n"):
        if not line.startswith("    "):
            break
        commands.append(line.strip())
    return commands


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The .deb, built by the README's first command (``make deb``)."""
    commands = readme_install_commands()
    assert commands[0] == "make deb", commands
    output = tmp_path_factory.mktemp("deb")
    built = subprocess.run(
        ["make", "-C", str(REPO), "deb", f"DEB_OUTPUT={output}"],
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEB_OUTPUT": str(output), "HOME": "/root"},
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (deb,) = output.glob("popauth_*_all.deb")
    return deb


@pytest.fixture(params=["bookworm", "trixie"])
def host(request: pytest.FixtureRequest) -> Iterator[DebianHost]:
    machine = DebianHost(request.param)
    try:
        machine.start()
        yield machine
    finally:
        machine.stop()


# --- clients on the host's loopback ----------------------------------------


def _tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # Debian's self-signed certificates
    return context


class _Pop3From(poplib.POP3):
    source = ""

    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, (self.source, 0))


class _ImapFrom(imaplib.IMAP4):
    source = ""

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, (self.source, 0))


def pop3_login(source: str) -> None:
    client = type("Pop3", (_Pop3From,), {"source": source})("127.0.0.1", 110, timeout=10)
    client.stls(_tls())
    client.user("alice")
    client.pass_(PASSWORD)
    client.quit()


def imap_session(source: str) -> imaplib.IMAP4:
    client = type("Imap", (_ImapFrom,), {"source": source})("127.0.0.1", 143, timeout=10)
    client.starttls(_tls())
    client.login("alice", PASSWORD)
    session: imaplib.IMAP4 = client
    return session


def rcpt(source: str, recipient: str, *, auth: bool = False) -> tuple[int, str]:
    """Postfix's reply to RCPT TO (or to the command before it that failed)."""
    with smtplib.SMTP("127.0.0.1", 25, timeout=20, source_address=(source, 0)) as smtp:
        smtp.ehlo("client.example")
        if auth:
            smtp.starttls(context=_tls())
            smtp.ehlo("client.example")
            smtp.login("alice", PASSWORD)
        code, text = smtp.mail("sender@client.example")
        if code != 250:
            return code, text.decode()
        code, text = smtp.rcpt(recipient)
        return code, text.decode()


def starttls_reply(source: str) -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", 25, timeout=20, source_address=(source, 0)) as smtp:
        smtp.ehlo("client.example")
        code, text = smtp.docmd("STARTTLS")
        return code, text.decode()


# --- the steps ----------------------------------------------------------------


def install_mail_host(host: DebianHost) -> None:
    """What the operator has before popauth: Debian's Postfix and Dovecot, a user."""
    host.run(
        ["debconf-set-selections"],
        input=(
            "postfix postfix/main_mailer_type select Internet Site\n"
            f"postfix postfix/mailname string {HOSTNAME}\n"
        ),
    )
    host.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *MAIL_HOST],
        env=("DEBIAN_FRONTEND=noninteractive",),
        timeout=600,
    )
    host.sh(f"useradd -m alice && echo alice:{PASSWORD} | chpasswd")
    host.add_addresses(POP_CLIENT, STRANGER, AUTH_CLIENT, IMAP_CLIENT)


def mail_configuration(host: DebianHost) -> str:
    return host.sh("postconf -n; doveconf -n").stdout


def run_readme(host: DebianHost, deb: Path, seen: dict[str, Any]) -> None:
    host.put(deb, f"/root/{deb.name}")
    before = mail_configuration(host)
    for command in readme_install_commands()[1:]:
        done = host.run(
            ["/bin/sh", "-ec", f"cd /root && {command}"],
            env=("DEBIAN_FRONTEND=noninteractive",),
            timeout=600,
        )
        seen[command] = done.stdout.strip().splitlines()[-3:]
        if command.startswith("apt install"):
            # Installing changes nothing for mail: Postfix and Dovecot as they were.
            assert mail_configuration(host) == before
            assert host.run(["systemctl", "is-active", "popauth"], check=False).stdout.strip() == (
                "inactive"
            )


def test_the_package_on_a_debian_host(host: DebianHost, package: Path) -> None:  # noqa: PLR0915
    seen: dict[str, Any] = {"release": host.release}
    started = time.monotonic()
    install_mail_host(host)
    run_readme(host, package, seen)
    # A second run of each setup command changes nothing.
    for target in ("postfix", "dovecot"):
        again = host.run(["popauth", "setup", target, "--apply"]).stdout
        assert "nothing changed" in again or "nothing to change" in again, again
    assert host.run(["id", "-u", "popauth"]).returncode == 0
    for unit in ("popauth", "popauth-sessions", "postfix", "dovecot"):
        assert host.unit_property(unit, "ActiveState") == "active", (unit, host.journal("-u", unit))
    assert host.unit_property("popauth-sessions", "Type") == "notify"

    with host.network():
        # A POP3 login, then relaying from that address.
        pop3_login(POP_CLIENT)
        seen["pop3 then relay"] = rcpt(POP_CLIENT, REMOTE)
        assert seen["pop3 then relay"][0] == 250
        # A stranger: refused for a remote recipient, accepted for a local one.
        seen["stranger remote"] = rcpt(STRANGER, REMOTE)
        assert seen["stranger remote"][0] == 550
        assert "5.7.1" in seen["stranger remote"][1]
        seen["stranger local"] = rcpt(STRANGER, LOCAL)
        assert seen["stranger local"][0] == 250
        # SMTP AUTH through Dovecot relays from anywhere.
        seen["smtp auth"] = rcpt(AUTH_CLIENT, REMOTE, auth=True)
        assert seen["smtp auth"][0] == 250

    # Restart keeps the whitelist (the snapshot is written at stop).
    host.run(["systemctl", "restart", "popauth"])
    assert host.run(["popauth", "query", POP_CLIENT]).returncode == 0
    with host.network():
        seen["after restart"] = rcpt(POP_CLIENT, REMOTE)
        assert seen["after restart"][0] == 250

    # Reload: local delivery learned again; an edited ttl is named as needing a restart.
    host.sh("sed -i 's/^#ttl = 900/ttl = 600/' /etc/popauth/popauth.toml")
    host.run(["systemctl", "reload", "popauth"])
    deadline = time.monotonic() + 20
    while "restart_needed" not in host.journal("-u", "popauth", "-p", "warning"):
        assert time.monotonic() < deadline, host.journal("-u", "popauth")
        time.sleep(0.2)
    warnings = host.journal("-u", "popauth", "-p", "warning")
    seen["journal -p warning"] = [line for line in warnings.splitlines() if "restart" in line]
    assert "ttl" in seen["journal -p warning"][-1]
    assert not re.search(r"^\d{4}-\d\d-\d\dT", warnings, re.MULTILINE)  # no second timestamp
    host.sh("sed -i 's/^ttl = 600/#ttl = 900/' /etc/popauth/popauth.toml")
    assert host.unit_property("popauth", "ActiveState") == "active"

    # The sandbox as systemd applies it: popauth's user, and only its own paths writable.
    assert host.unit_property("popauth", "User") == "popauth"
    assert host.unit_property("popauth", "ProtectSystem") == "strict"
    pid = host.main_pid("popauth")
    owner = host.run(["stat", "-c", "%U", f"/proc/{pid}"]).stdout.strip()
    assert owner == "popauth"
    writable = {}
    uid, gid = (
        host.run(["id", "-u", "popauth"]).stdout.strip(),
        host.run(["id", "-g", "popauth"]).stdout.strip(),
    )
    for path in ("/etc", "/usr/lib", "/var/spool/postfix", "/var/lib/popauth", "/run/popauth"):
        # In the service's own mount namespace and root, as its user (numeric ids:
        # nothing to look up there), the way popauth itself would write.
        as_popauth = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
        touch = ["touch", f"{path}/.popauth-probe"]
        probe = host.run(["nsenter", "-t", str(pid), "-m", "-r", *as_popauth, *touch], check=False)
        writable[path] = probe.returncode == 0
        seen[f"touch {path}"] = probe.stderr.strip()
    seen["writable"] = writable
    assert writable == {
        "/etc": False,
        "/usr/lib": False,
        "/var/spool/postfix": False,
        "/var/lib/popauth": True,
        "/run/popauth": True,
    }, [value for key, value in seen.items() if key.startswith("touch")]

    # An IMAP session held open past ttl keeps relaying (popauth sessions renews it).
    drop_in = """[Service]
ExecStart=
ExecStart=/usr/bin/popauth {command} --config /etc/popauth/test.toml
"""
    host.sh(
        "cp /etc/popauth/popauth.toml /etc/popauth/test.toml"
        f" && echo 'ttl = {TEST_TTL}' >> /etc/popauth/test.toml"
        " && echo 'session_renew_interval = 1' >> /etc/popauth/test.toml"
    )
    for unit, command in (("popauth", "serve"), ("popauth-sessions", "sessions")):
        directory = host.root / "etc" / "systemd" / "system" / f"{unit}.service.d"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "test-ttl.conf").write_text(drop_in.format(command=command))
    host.run(["systemctl", "daemon-reload"])
    host.run(["systemctl", "restart", "popauth", "popauth-sessions"])
    host.run(["popauth", "revoke", POP_CLIENT])  # its entry from before had the long ttl
    with host.network():
        session = imap_session(IMAP_CLIENT)
        pop3_login(POP_CLIENT)
        try:
            time.sleep(TEST_TTL + 3)  # the point of the test: time passes beyond ttl
            session.noop()
            seen["imap held past ttl"] = rcpt(IMAP_CLIENT, REMOTE)
            seen["pop3 past ttl"] = rcpt(POP_CLIENT, REMOTE)
        finally:
            session.logout()
    assert seen["imap held past ttl"][0] == 250
    assert seen["pop3 past ttl"][0] == 550
    for unit in ("popauth", "popauth-sessions"):
        (host.root / "etc" / "systemd" / "system" / f"{unit}.service.d" / "test-ttl.conf").unlink()
    # The test's own file: purge removes only what the package made.
    (host.root / "etc" / "popauth" / "test.toml").unlink()
    host.run(["systemctl", "daemon-reload"])
    host.run(["systemctl", "restart", "popauth", "popauth-sessions"])

    # popauth stopped: Postfix fails closed with a temporary error.
    host.run(["systemctl", "stop", "popauth"])
    with host.network():
        pop3_login(POP_CLIENT)  # the hook cannot report; the login goes on
        seen["stopped relay"] = rcpt(POP_CLIENT, REMOTE)
        seen["stopped local"] = rcpt(STRANGER, LOCAL)
        seen["stopped starttls"] = starttls_reply(STRANGER)
    assert 400 <= seen["stopped relay"][0] < 500
    assert 400 <= seen["stopped local"][0] < 500
    host.run(["systemctl", "start", "popauth"])

    # Operator commands: the manual page, the units' documentation, check-config as non-root.
    manual = host.run(["man", "-P", "cat", "popauth"], env=("MANWIDTH=80",))
    assert "POP-before-SMTP" in manual.stdout
    for unit in ("popauth", "popauth-sessions"):
        for path in host.documentation_paths(unit):
            assert (host.root / path.lstrip("/")).is_file(), (unit, path)
    as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    checked = host.run([*as_nobody, "popauth", "check-config"], check=False)
    seen["check-config as nobody"] = (checked.returncode, checked.stderr.strip())
    assert "Traceback" not in checked.stderr, checked.stderr[-1500:]
    assert len(checked.stderr.strip().splitlines()) <= 1

    # Purge: no user, no state, no unit.
    host.run(["apt-get", "purge", "-y", "-q", "popauth"], env=("DEBIAN_FRONTEND=noninteractive",))
    assert host.run(["getent", "passwd", "popauth"], check=False).returncode == 2
    assert host.run(["getent", "group", "popauth"], check=False).returncode == 2
    for path in ("var/lib/popauth", "etc/popauth", "lib/systemd/system/popauth.service"):
        assert not (host.root / path).exists(), path
    units = host.run(["systemctl", "list-units", "--all", "--plain", "popauth*"]).stdout
    assert "popauth.service" not in units or "not-found" in units
    seen["seconds"] = round(time.monotonic() - started, 1)
    print(seen)
