"""Local delivery learned from a real Sendmail with a virtusertable domain.

The .cf is contrib/sendmail.mc plus ``FEATURE(virtusertable)`` and
``VIRTUSER_DOMAIN(virt.test)``: Sendmail delivers ``info@virt.test`` to the
local user ``root`` through the virtusertable. popauth runs with learned
settings only and asks that very Sendmail (``sendmail -bt``) for class w,
class {VirtHost} and its local mailer.

Sendmail waits 60 s at start on an unqualified host name, in test mode too,
so popauth runs in a private UTS namespace named mx.local.test, as the
Sendmail daemon of the harness does.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.popauth import POPAUTH, PopauthServer
from harness.ports import free_port
from harness.sendmail import (
    CONTRIB_MC,
    DEFAULT_CACHE_DIR,
    SENDMAIL_BIN,
    SendmailInstance,
    ensure_sendmail_root,
    wrap_contrib_mc,
)
from harness.smtp import REMOTE, SmtpSession, rcpt_reply
from tests.live.conftest import PopauthFactory

pytestmark = pytest.mark.live

STRANGER = "127.0.0.3"
VIRTUAL = "virt.test"
HOSTNAME = "mx.local.test"
# Runs popauth with the host name Sendmail needs; it execs popauth itself.
QUALIFIED_HOST = ["unshare", "--uts", "sh", "-c", f'hostname {HOSTNAME} && exec "$0" "$@"']
DISGUISES = (
    f"someone%remote.example@{VIRTUAL}",
    f"remote.example!someone@{VIRTUAL}",
    f'"someone@remote.example"@{VIRTUAL}',
    f"@{VIRTUAL}:someone@remote.example",
    f"someone@remote.example@{VIRTUAL}",
)


@pytest.fixture(scope="module")
def virtuser_sendmail(live_root: Path, popauth_dir: Path) -> Iterator[SendmailInstance]:
    root = ensure_sendmail_root(DEFAULT_CACHE_DIR)
    workdir = live_root / "sendmail-virtuser"
    workdir.mkdir(mode=0o755)
    table = workdir / "virtusertable"
    table.write_text(f"info@{VIRTUAL}\troot\n")
    port = free_port()
    mc = wrap_contrib_mc(
        CONTRIB_MC.read_text(),
        workdir,
        port,
        milter_socket=f"unix:{popauth_dir / 'milter.sock'}",
        local_domains="local.test",
        features=(
            f"FEATURE(`virtusertable', `hash -o {table}')dnl\nVIRTUSER_DOMAIN(`{VIRTUAL}')dnl"
        ),
    )
    instance = SendmailInstance(root, workdir, port, mc, hostname=HOSTNAME)
    instance.prepare()  # the .cf, which makemap reads too
    makemap = [str(root / "usr" / "sbin" / "makemap"), "-C", str(instance.cf_path)]
    with table.open("rb") as source:
        subprocess.run([*makemap, "hash", str(table)], stdin=source, check=True)
    instance.start()
    yield instance
    instance.stop()


def learned_popauth(start_popauth: PopauthFactory, sendmail: SendmailInstance) -> PopauthServer:
    return start_popauth(
        local_domains=None,
        local_mailers=None,
        learn_from_mta="sendmail",
        sendmail_cf=str(sendmail.cf_path),
        sendmail_command=str(sendmail.root / SENDMAIL_BIN),
        wrapper=QUALIFIED_HOST,
    )


def test_virtusertable_domain_learned_and_accepted(
    virtuser_sendmail: SendmailInstance, start_popauth: PopauthFactory
) -> None:
    sendmail = virtuser_sendmail
    popauth = learned_popauth(start_popauth, sendmail)
    shown = subprocess.run(
        [*QUALIFIED_HOST, POPAUTH, "check-config", str(popauth.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert shown.returncode == 0, shown
    lines = shown.stdout.splitlines()
    assert any(line.split()[:1] == ["local"] and "sendmail ruleset parse" in line for line in lines)
    assert f"  {VIRTUAL:<24} sendmail class {{VirtHost}}" in lines, shown.stdout
    assert f"  {'local.test':<24} sendmail class w" in lines, shown.stdout
    assert f"  {HOSTNAME:<24} sendmail class w" in lines, shown.stdout

    for recipient in (f"info@{VIRTUAL}", "root@local.test"):
        with SmtpSession(sendmail.smtp_port, STRANGER) as session:
            assert session.mail()[0] == 250
            assert session.rcpt(recipient)[0] == 250, recipient
            assert session.send_message([recipient])[0] == 250
        decision = popauth.events("relay_decision")[-1]
        assert decision["reason"] == "local_recipient", decision
        assert decision["rcpt_mailer"] == "local", decision
    assert popauth.events("relay_decision")[-2]["rcpt_addr"] == "root"  # the virtusertable's

    code, text = rcpt_reply(sendmail.smtp_port, STRANGER, REMOTE)
    assert code == 550 and "Relaying denied" in text, (code, text)
    for disguise in DISGUISES:
        before = len(popauth.events("relay_decision"))
        code, text = rcpt_reply(sendmail.smtp_port, STRANGER, disguise)
        print(f"sendmail {VIRTUAL}: RCPT TO:<{disguise}> -> {code} {text}")
        assert 500 <= code < 600, (disguise, code, text)
        decisions = popauth.events("relay_decision")[before:]
        if "Relaying denied" in text:
            assert decisions[-1]["reason"] == "relay_denied", decisions
        else:
            # Sendmail's own refusal ("Invalid route address") before popauth.
            assert decisions == [], (disguise, code, text, decisions)
    assert popauth.events("local_domain_with_foreign_mailer") == []
