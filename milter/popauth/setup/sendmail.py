"""``popauth setup sendmail``: popauth's lines in Debian's own sendmail.mc.

Debian rebuilds sendmail.cf from /etc/mail/sendmail.mc (``make -C
/etc/mail``, which ``sendmailconfig`` runs), so the lines go there, before
the mailer definitions, between two marker comments: a second run finds
them and changes nothing. The filter is declared ``F=T`` (fail closed) and
``promiscuous_relay`` hands the relay decision to popauth; the macro lines
add what popauth reads without replacing Sendmail's lists
(contrib/sendmail.mc explains each).
"""

from __future__ import annotations

from pathlib import Path

from popauth.config import Settings
from popauth.setup import FileChange, Plan

BEGIN = "dnl # BEGIN popauth (popauth setup sendmail)"
END = "dnl # END popauth"
MACROS = (
    ("confMILTER_MACROS_CONNECT", "{client_addr}"),
    ("confMILTER_MACROS_ENVFROM", "{auth_authen}"),
    ("confMILTER_MACROS_ENVRCPT", "{rcpt_mailer}"),
    ("confMILTER_MACROS_ENVRCPT", "{rcpt_addr}"),
    ("confMILTER_MACROS_ENVRCPT", "{rcpt_host}"),
)


def popauth_lines(socket_spec: str) -> list[str]:
    return [
        BEGIN,
        "FEATURE(`promiscuous_relay')dnl",
        f"INPUT_MAIL_FILTER(`popauth', `S={socket_spec}, F=T, T=C:5s;S:10s;R:20s;E:5m')dnl",
        "define(`POPAUTH_MILTER_MACRO',",
        "\t`ifelse(index(defn(`$1'), `$2'), `-1',",
        "\t\t`define(`$1', ifelse(defn(`$1'), `', ``$2'', `defn(`$1')``, $2'''))')')dnl",
        *(f"POPAUTH_MILTER_MACRO(`{name}', `{macro}')dnl" for name, macro in MACROS),
        END,
    ]


def with_popauth(text: str, socket_spec: str) -> str:
    """``text`` (a sendmail.mc) with popauth's block in place, before the mailers."""
    lines = text.split("\n")
    if BEGIN in lines and END in lines:
        start, end = lines.index(BEGIN), lines.index(END)
        lines[start : end + 1] = popauth_lines(socket_spec)
        return "\n".join(lines)
    anchor = next(
        (
            index
            for index, line in enumerate(lines)
            if line.startswith(("MAILER_DEFINITIONS", "MAILER("))
        ),
        len(lines),
    )
    lines[anchor:anchor] = popauth_lines(socket_spec)
    return "\n".join(lines)


def plan_sendmail(settings: Settings, *, mc: Path = Path("/etc/mail/sendmail.mc")) -> Plan:
    plan = Plan("sendmail")
    spec = settings.milter.socket
    if "/var/spool/postfix/" in spec:
        plan.refusals.append(
            f"popauth's milter_socket ({spec}) is in Postfix's spool: on a Sendmail host set"
            ' milter_socket = "unix:/run/popauth/milter.sock" in popauth.toml, then restart'
            " popauth"
        )
    if not mc.exists():
        plan.refusals.append(f"{mc} does not exist (is Debian's sendmail installed?)")
    if plan.refusals:
        return plan
    text = mc.read_text(errors="replace")
    for line in text.split("\n"):
        if line.startswith("INPUT_MAIL_FILTER(`popauth'") and BEGIN not in text:
            plan.refusals.append(f"{mc} already declares a popauth filter: edit it by hand")
            return plan
    edited = with_popauth(text, spec)
    if edited != text:
        plan.files.append(FileChange(mc, edited))
        plan.commands.append(("make", "-C", str(mc.parent)))
        plan.commands.append(("systemctl", "reload-or-restart", "sendmail.service"))
        plan.notes.append(
            "promiscuous_relay turns Sendmail's own relay check off: safe only with F=T;"
            " check `grep ^Xpopauth /etc/mail/sendmail.cf` shows F=T"
        )
    return plan
