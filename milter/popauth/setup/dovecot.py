"""``popauth setup dovecot``: the login hook, Postfix's SASL listener, popauth sessions.

One file, ``conf.d/95-popauth.conf``, that Debian's dovecot.conf includes:
the post-login hook for each of POP3 and IMAP that Dovecot serves, and, on
a host with Postfix, the ``auth`` listener inside Postfix's queue directory
for SMTP AUTH (then the three ``smtpd_sasl_*`` settings in main.cf). The
syntax is the one Dovecot 2.3 and 2.4 share. ``popauth-sessions`` is
enabled: IMAP clients stay connected for hours. It refuses when popauth's
settings would refuse the hook's reports (the hook user is not a reporter,
or cannot reach the ingest socket).
"""

from __future__ import annotations

import grp
import pwd
from pathlib import Path

from popauth.config import Settings
from popauth.doors.ingest.wire import DEFAULT_SOCKET
from popauth.setup import FileChange, Plan, run
from popauth.setup.postfix import SASL, read_postconf

HOOK = "/usr/libexec/popauth/popauth-login"
CONF_NAME = "95-popauth.conf"
PROTOCOLS = ("pop3", "imap")


def hook_blocks(protocol: str, hook_command: str, user: str) -> str:
    return f"""\
service {protocol} {{
  executable = {protocol} {protocol}-postlogin
}}
service {protocol}-postlogin {{
  executable = script-login {hook_command}
  user = {user}
  unix_listener {protocol}-postlogin {{
  }}
}}
"""


def sasl_block(queue_directory: str) -> str:
    return f"""\
# SMTP AUTH for Postfix (smtpd_sasl_type = dovecot, smtpd_sasl_path = private/auth).
service auth {{
  unix_listener {queue_directory}/private/auth {{
    mode = 0660
    user = postfix
    group = postfix
  }}
}}
"""


def conf_text(protocols: list[str], hook_command: str, user: str, queue: str | None) -> str:
    parts = [
        "# Written by popauth setup dovecot: report POP3 and IMAP logins to popauth.\n"
        "# The hook runs after each successful login, as the internal dovecot user,\n"
        "# and then becomes the mail process: a failure never holds a login up.\n"
    ]
    parts += [hook_blocks(protocol, hook_command, user) for protocol in protocols]
    if queue is not None:
        parts.append(sasl_block(queue))
    return "\n".join(parts)


def _reporter_refusals(settings: Settings, user: str) -> list[str]:
    """Why the hook, running as ``user``, could not report logins to this popauth."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return [f"Dovecot's internal user {user!r} does not exist"]
    ingest = settings.ingest
    groups = {entry.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    refusals = []
    reporter = entry.pw_uid in {allowed.uid for allowed in ingest.allowed_users}
    if not reporter and not groups & {allowed.gid for allowed in ingest.allowed_groups}:
        refusals.append(
            f"popauth does not take logins from {user!r}: add it to ingest_allowed_users"
            f' in popauth.toml (ingest_allowed_users = ["{user}"]), restart popauth'
        )
    reachable = ingest.socket_mode & 0o006 == 0o006 or (
        ingest.socket_mode & 0o060 == 0o060
        and ingest.socket_group is not None
        and ingest.socket_group.gid in groups
    )
    if not reachable:
        refusals.append(
            f"{user!r} cannot reach the ingest socket (mode {ingest.socket_mode:04o}, group"
            f" {str(ingest.socket_group or 'popauth')!r}): set ingest_socket_group ="
            f' "{user}"'
            ' or ingest_socket_mode = "0666"'
        )
    return refusals


def plan_dovecot(
    settings: Settings,
    *,
    config_directory: str = "/etc/dovecot",
    doveconf: tuple[str, ...] = ("doveconf",),
    postconf: tuple[str, ...] = ("postconf",),
    systemd: bool = True,
) -> Plan:
    plan = Plan("dovecot")
    conf_file = Path(config_directory) / "dovecot.conf"
    read = run([*doveconf, "-c", str(conf_file), "-h", "protocols"])
    if read.returncode != 0:
        plan.refusals.append(f"doveconf cannot read Dovecot's settings: {read.stderr.strip()}")
        return plan
    served = read.stdout.split()
    protocols = [protocol for protocol in PROTOCOLS if protocol in served]
    if not protocols:
        plan.refusals.append(f"Dovecot serves neither POP3 nor IMAP (protocols = {served})")
    user_read = run([*doveconf, "-c", str(conf_file), "-h", "default_internal_user"])
    user = user_read.stdout.strip() or "dovecot"
    plan.refusals += _reporter_refusals(settings, user)
    hook_command = HOOK
    if str(settings.ingest.socket) != DEFAULT_SOCKET:
        hook_command = f"/usr/bin/env POPAUTH_SOCKET={settings.ingest.socket} {HOOK}"

    queue: str | None = None
    sasl: list[tuple[str, str]] = []
    try:
        values = read_postconf(postconf)(["-x", "queue_directory", *(n for n, _ in SASL)])
    except (OSError, Exception):
        values = {}
    if values and Path(values["queue_directory"]).is_dir():
        queue = values["queue_directory"]
        if values.get("smtpd_sasl_auth_enable") != "yes":
            sasl = list(SASL)
        elif values.get("smtpd_sasl_type") != "dovecot":
            plan.notes.append(
                f"Postfix already uses {values.get('smtpd_sasl_type')} for SMTP AUTH; kept"
            )
            queue = None

    target = Path(config_directory) / "conf.d" / CONF_NAME
    text = conf_text(protocols, hook_command, user, queue)
    if not target.exists() or target.read_text(errors="replace") != text:
        plan.files.append(FileChange(target, text))
    if plan.files:
        plan.check = (*doveconf, "-c", str(conf_file), "-n")
        reload = ("systemctl", "reload-or-restart", "dovecot.service")
        plan.commands.append(reload if systemd else ("doveadm", "reload"))
    if sasl:
        plan.backups.append(Path(postconf_directory(postconf)) / "main.cf")
        plan.commands.append((*postconf, "-e", *(f"{n} = {v}" for n, v in sasl)))
        plan.commands.append(("postfix", "check"))
        plan.commands.append(("postfix", "reload"))
    if systemd and run(["systemctl", "is-enabled", "popauth-sessions.service"]).stdout.strip() != (
        "enabled"
    ):
        plan.commands.append(("systemctl", "enable", "--now", "popauth-sessions.service"))
    return plan


def postconf_directory(postconf: tuple[str, ...]) -> str:
    done = run([*postconf, "-h", "config_directory"])
    return done.stdout.strip() or "/etc/postfix"
