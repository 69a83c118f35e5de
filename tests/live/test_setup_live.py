"""``popauth setup postfix`` on a Postfix configuration as a real site has it.

A private config directory for the machine's own Postfix: Debian's
"Internet Site" main.cf with a site's comments and an opendkim milter, and
the stock master.cf with a submission service carrying ``-o`` overrides.
``postconf`` and ``postfix check`` are the real ones. The same runs on Debian's
untouched configuration in tests/live/test_debian_host.py.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from popauth.cli import EXIT_ERROR, EXIT_OK, main

pytestmark = pytest.mark.live

SITE_MAIN_CF = """\
# See /usr/share/postfix/main.cf.dist for a commented, more complete version

smtpd_banner = $myhostname ESMTP $mail_name (Debian/GNU)
biff = no
append_dot_mydomain = no
readme_directory = no
compatibility_level = 3.6

# TLS parameters
smtpd_tls_security_level=may
smtp_tls_security_level=may

smtpd_relay_restrictions = permit_mynetworks permit_sasl_authenticated defer_unauth_destination
myhostname = mx.example.test
alias_maps =
mydestination = $myhostname, example.test, localhost
relayhost =
mynetworks = 127.0.0.0/8 [::ffff:127.0.0.0]/104 [::1]/128
mailbox_size_limit = 0
recipient_delimiter = +
inet_interfaces = loopback-only
inet_protocols = ipv4
# DKIM signing: opendkim on 8891 (ours, keep it)
smtpd_milters = inet:127.0.0.1:8891
non_smtpd_milters = $smtpd_milters
queue_directory = {root}/spool
data_directory = {root}/data
"""
SUBMISSION = """\
submission inet n       -       y       -       -       smtpd
  -o syslog_name=postfix/submission
  -o smtpd_tls_security_level=encrypt
  -o smtpd_sasl_auth_enable=yes
  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject
  -o smtpd_milters=inet:127.0.0.1:8891
"""


def postconf(directory: Path, *names: str) -> dict[str, str]:
    shown = subprocess.run(
        ["postconf", "-c", str(directory), *names], capture_output=True, text=True, check=True
    ).stdout
    return dict(line.split(" = ", 1) for line in shown.splitlines() if " = " in line)


@pytest.fixture
def site(tmp_path: Path) -> Path:
    root = tmp_path / "postfix"
    directory = root / "etc"
    directory.mkdir(parents=True)
    (root / "spool").mkdir()
    (root / "data").mkdir()
    subprocess.run(["chown", "postfix", str(root / "data")], check=True)
    (directory / "main.cf").write_text(SITE_MAIN_CF.format(root=root))
    stock = Path("/usr/share/postfix/master.cf.dist").read_text()
    (directory / "master.cf").write_text(stock + SUBMISSION)
    return directory


def settings_file(tmp_path: Path, site: Path, extra: str = "") -> Path:
    path = tmp_path / "popauth.toml"
    spool = site.parent / "spool"
    path.write_text(f'milter_socket = "unix:{spool}/popauth/milter.sock"\n{extra}')
    return path


def setup(settings: Path, site: Path, *more: str) -> int:
    return main(["setup", "postfix", "--config", str(settings), "--mta-config", str(site), *more])


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_setup_keeps_the_site_and_fails_closed(
    tmp_path: Path, site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = settings_file(tmp_path, site)
    master = digest(site / "master.cf")
    before = (site / "main.cf").read_text()
    # Printed, nothing changed.
    assert setup(settings, site) == EXIT_OK
    printed = capsys.readouterr().out
    assert "postconf -e 'smtpd_relay_restrictions = check_client_access cidr:" in printed
    assert (site / "main.cf").read_text() == before
    assert "master.cf: submission/inet has -o smtpd_milters" in printed

    assert setup(settings, site, "--apply") == EXIT_OK
    applied = capsys.readouterr().out
    assert "postfix -c" in applied and "check: OK" in applied
    values = postconf(site, "smtpd_relay_restrictions", "smtpd_milters", "non_smtpd_milters")
    assert values["smtpd_relay_restrictions"] == (
        f"check_client_access cidr:{site}/popauth-relay.cidr, reject_unauth_destination"
    )
    # The site's milter first and untouched; popauth fails closed on its own.
    assert values["smtpd_milters"] == (
        "inet:127.0.0.1:8891, { unix:popauth/milter.sock, default_action=tempfail }"
    )
    # Local submissions keep only the milters they had: popauth judges SMTP clients.
    assert values["non_smtpd_milters"] == "inet:127.0.0.1:8891"
    text = (site / "main.cf").read_text()
    assert "# DKIM signing: opendkim on 8891 (ours, keep it)" in text
    assert "# TLS parameters" in text
    assert digest(site / "master.cf") == master
    (backup,) = site.glob("main.cf.popauth-*")
    assert backup.read_text() == before
    assert (site / "popauth-relay.cidr").read_text().splitlines()[-2:] == [
        "0.0.0.0/0   OK",
        "::/0        OK",
    ]
    # Idempotent.
    after = (site / "main.cf").read_text()
    assert setup(settings, site, "--apply") == EXIT_OK
    assert "nothing changed" in capsys.readouterr().out
    assert (site / "main.cf").read_text() == after
    assert len(list(site.glob("main.cf.popauth-*"))) == 1


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        # The site relays for a network popauth does not trust.
        ("mynetworks = 10.0.0.0/8, 127.0.0.0/8", "10.0.0.0/8"),
        # An access table may answer OK for clients popauth would refuse.
        (
            "smtpd_relay_restrictions = permit_mynetworks,"
            " check_client_access hash:/etc/postfix/relay_clients, reject_unauth_destination",
            "check_client_access hash:/etc/postfix/relay_clients",
        ),
        # Postfix would refuse what popauth allows.
        (
            "smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination",
            "smtpd_recipient_restrictions has reject_unauth_destination",
        ),
    ],
)
def test_setup_refuses_a_contradicting_configuration(
    tmp_path: Path, site: Path, capsys: pytest.CaptureFixture[str], edit: str, reason: str
) -> None:
    with (site / "main.cf").open("a") as main_cf:
        main_cf.write(edit + "\n")
    before = (site / "main.cf").read_text()
    assert setup(settings_file(tmp_path, site), site, "--apply") == EXIT_ERROR
    shown = capsys.readouterr().out
    assert "refused:" in shown and reason in shown, shown
    assert "nothing was changed" in shown
    assert (site / "main.cf").read_text() == before
    assert not list(site.glob("main.cf.popauth-*"))
    assert not (site / "popauth-relay.cidr").exists()


def test_setup_refuses_a_socket_a_chrooted_smtpd_cannot_reach(
    tmp_path: Path, site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = tmp_path / "popauth.toml"
    settings.write_text('milter_socket = "unix:/run/popauth/milter.sock"\n')
    assert setup(settings, site, "--apply") == EXIT_ERROR
    assert "outside Postfix's queue directory" in capsys.readouterr().out


def policy_settings_file(tmp_path: Path, site: Path) -> Path:
    spool = site.parent / "spool"
    return settings_file(
        tmp_path, site, f'policy_socket = "{spool}/popauth/policy.sock"\npolicy_socket_group = ""\n'
    )


def test_setup_for_the_policy_door_asks_popauth_after_local_mail_and_fails_closed(
    tmp_path: Path, site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = policy_settings_file(tmp_path, site)
    before = (site / "main.cf").read_text()
    assert setup(settings, site, "--door", "policy") == EXIT_OK
    printed = capsys.readouterr().out
    assert "check_policy_service unix:popauth/policy.sock" in printed
    assert (site / "main.cf").read_text() == before

    assert setup(settings, site, "--door", "policy", "--apply") == EXIT_OK
    assert "check: OK" in capsys.readouterr().out
    values = postconf(
        site, "smtpd_relay_restrictions", "smtpd_milters", "smtpd_policy_service_default_action"
    )
    assert values["smtpd_relay_restrictions"] == (
        "permit_auth_destination, check_policy_service unix:popauth/policy.sock,"
        " reject_unauth_destination"
    )
    # The site's milter stays; popauth's milter is not asked as well.
    assert values["smtpd_milters"] == "inet:127.0.0.1:8891"
    assert values["smtpd_policy_service_default_action"].startswith("451 ")
    assert not (site / "popauth-relay.cidr").exists()
    # Idempotent.
    assert setup(settings, site, "--door", "policy", "--apply") == EXIT_OK
    assert "nothing changed" in capsys.readouterr().out


def test_setup_moves_a_site_from_the_milter_door_to_the_policy_door(
    tmp_path: Path, site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = policy_settings_file(tmp_path, site)
    assert setup(settings, site, "--apply") == EXIT_OK
    with (site / "main.cf").open("a") as main_cf:
        # A site that let unreachable policy services pass.
        main_cf.write("smtpd_policy_service_default_action = DUNNO\n")
    assert setup(settings, site, "--door", "policy", "--apply") == EXIT_OK
    capsys.readouterr()
    values = postconf(
        site, "smtpd_relay_restrictions", "smtpd_milters", "smtpd_policy_service_default_action"
    )
    assert values["smtpd_relay_restrictions"] == (
        "permit_auth_destination, check_policy_service unix:popauth/policy.sock,"
        " reject_unauth_destination"
    )
    assert values["smtpd_milters"] == "inet:127.0.0.1:8891"
    assert values["smtpd_policy_service_default_action"] == "451 4.3.5 Server configuration problem"
    # And back: the milter door drops the policy check again.
    assert setup(settings, site, "--apply") == EXIT_OK
    values = postconf(site, "smtpd_relay_restrictions")
    assert values["smtpd_relay_restrictions"] == (
        f"check_client_access cidr:{site}/popauth-relay.cidr, reject_unauth_destination"
    )


@pytest.mark.parametrize(
    ("policy_socket", "reason"),
    [
        ("", "the policy door is off (no policy_socket)"),
        ('policy_socket = "/run/popauth/policy.sock"\n', "outside Postfix's queue directory"),
    ],
)
def test_setup_for_the_policy_door_refuses_a_socket_smtpd_cannot_reach(
    tmp_path: Path,
    site: Path,
    capsys: pytest.CaptureFixture[str],
    policy_socket: str,
    reason: str,
) -> None:
    settings = settings_file(tmp_path, site, policy_socket)
    assert setup(settings, site, "--door", "policy", "--apply") == EXIT_ERROR
    assert reason in capsys.readouterr().out


def test_the_policy_door_is_for_postfix_only(
    tmp_path: Path, site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = policy_settings_file(tmp_path, site)
    assert main(["setup", "sendmail", "--config", str(settings), "--door", "policy"]) == EXIT_ERROR
    assert "postfix only" in capsys.readouterr().err
