"""A private Postfix that delivers one domain into Maildirs, for mail popauth itself sends.

Postfix's own ``virtual`` delivery agent (a real one, in place of the
harness's discarding service of that name) delivers ``USER@DOMAIN`` into
``MAIL_ROOT/USER/Maildir/`` as ``nobody``; every other transport still
discards, and smtpd listens on loopback only. Mail reaches it through its
own ``sendmail -C CONFIG_DIR`` (pickup), or over SMTP through the milter.
"""

from __future__ import annotations

import os
import pwd
import time
from collections.abc import Sequence
from pathlib import Path

from harness.ports import free_port
from harness.postfix import PostfixInstance

MAILDIR_DOMAIN = "local.test"


def prepare_mail_root(mail_root: Path) -> None:
    """The base directory of the Maildirs, writable by the delivery user."""
    nobody = pwd.getpwnam("nobody")
    mail_root.mkdir(parents=True, exist_ok=True)
    os.chown(mail_root, nobody.pw_uid, nobody.pw_gid)
    mail_root.chmod(0o755)


class MaildirPostfix(PostfixInstance):
    """The harness's Postfix with a real, privileged ``virtual`` agent (it writes as ``nobody``)."""

    def master_cf(self) -> str:
        lines = super().master_cf().splitlines()
        privileged = [
            "virtual unix - n n - - virtual" if line.startswith("virtual ") else line
            for line in lines
        ]
        return "\n".join(privileged) + "\n"


def maildir_postfix(
    root: Path, *, milter: str | None, mail_root: Path, users: Sequence[str], name: str = "mx"
) -> PostfixInstance:
    """An unstarted Postfix delivering ``USER@local.test`` for ``users`` into ``mail_root``."""
    root.mkdir(parents=True, exist_ok=True)
    mailboxes = root / "vmailbox"
    mailboxes.write_text(
        "".join(f"{user}@{MAILDIR_DOMAIN} {user}/Maildir/\n" for user in users), encoding="ascii"
    )
    nobody = pwd.getpwnam("nobody")
    return MaildirPostfix(
        root=root / "postfix",
        smtp_port=free_port(),
        milter=milter,
        local_domain="localhost",
        extra_main_cf={
            "myhostname": f"{name}.{MAILDIR_DOMAIN}",
            "myorigin": MAILDIR_DOMAIN,
            "mydestination": "localhost",
            "virtual_mailbox_domains": MAILDIR_DOMAIN,
            "virtual_mailbox_base": str(mail_root),
            "virtual_mailbox_maps": f"texthash:{mailboxes}",
            "virtual_uid_maps": f"static:{nobody.pw_uid}",
            "virtual_gid_maps": f"static:{nobody.pw_gid}",
            "virtual_transport": "virtual",
        },
    )


def delivered(mail_root: Path, user: str) -> list[Path]:
    """The messages in ``user``'s Maildir ``new/``, oldest first."""
    new = mail_root / user / "Maildir" / "new"
    return sorted(new.iterdir(), key=lambda p: p.stat().st_mtime) if new.is_dir() else []


def wait_for_delivery(
    mail_root: Path, user: str, count: int = 1, timeout: float = 30.0
) -> list[Path]:
    """``user``'s messages once there are ``count`` of them (fewer after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = delivered(mail_root, user)
        if len(found) >= count:
            return found
        time.sleep(0.05)
    return delivered(mail_root, user)
