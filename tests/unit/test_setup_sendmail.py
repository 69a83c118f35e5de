"""popauth setup sendmail: popauth's block in Debian's sendmail.mc, once."""

from __future__ import annotations

from pathlib import Path

from popauth.config import settings_from_mapping
from popauth.setup.sendmail import BEGIN, END, plan_sendmail, with_popauth

# The shape of Debian's /etc/mail/sendmail.mc (sendmail-cf 8.17).
DEBIAN_MC = """\
divert(-1)dnl
include(`/usr/share/sendmail/cf/m4/cf.m4')dnl
VERSIONID(`$Id: sendmail.mc, v 8.17.1.9-2 2022-10-30 20:42:40 cowboy Exp $')
OSTYPE(`debian')dnl
DOMAIN(`debian-mta')dnl
dnl # Items controlled by /etc/mail/sendmail.conf - DO NOT TOUCH HERE
undefine(`confHOST_STATUS_DIRECTORY')dnl        #DAEMON_HOSTSTATS=
FEATURE(`no_default_msa')dnl
DAEMON_OPTIONS(`Family=inet,  Name=MTA-v4, Port=smtp, Addr=127.0.0.1')dnl
include(`/etc/mail/m4/dialup.m4')dnl
include(`/etc/mail/m4/provider.m4')dnl
MAILER_DEFINITIONS
MAILER(`local')dnl
MAILER(`smtp')dnl
"""
SOCKET = "unix:/run/popauth/milter.sock"


def test_the_block_goes_before_the_mailers_once() -> None:
    edited = with_popauth(DEBIAN_MC, SOCKET)
    lines = edited.split("\n")
    assert lines.index(END) + 1 == lines.index("MAILER_DEFINITIONS")
    assert f"INPUT_MAIL_FILTER(`popauth', `S={SOCKET}, F=T, T=C:5s;S:10s;R:20s;E:5m')dnl" in lines
    assert "FEATURE(`promiscuous_relay')dnl" in lines
    # The site's lines stay, in order.
    assert edited.replace(
        "\n".join(lines[lines.index(BEGIN) : lines.index(END) + 1]) + "\n", ""
    ) == (DEBIAN_MC)
    assert with_popauth(edited, SOCKET) == edited


def test_the_plan(tmp_path: Path) -> None:
    mc = tmp_path / "sendmail.mc"
    mc.write_text(DEBIAN_MC)
    settings = settings_from_mapping({"milter_socket": SOCKET})
    plan = plan_sendmail(settings, mc=mc)
    assert not plan.refusals
    assert plan.files and plan.commands[0] == ("make", "-C", str(tmp_path))
    mc.write_text(plan.files[0].content)
    assert not plan_sendmail(settings, mc=mc).changes_anything
    # The Debian package's Postfix socket: say what to change in popauth.toml.
    spooled = settings_from_mapping(
        {"milter_socket": "unix:/var/spool/postfix/popauth/milter.sock"}
    )
    (refusal,) = plan_sendmail(spooled, mc=mc).refusals
    assert 'milter_socket = "unix:/run/popauth/milter.sock"' in refusal
