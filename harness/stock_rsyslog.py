"""Debian's own rsyslog, with its stock ``/etc/rsyslog.conf``, in a private mount namespace.

The package is the one ``harness/logservers.py`` unpacks (``harness.debs``).
Inside the namespace rsyslogd sees the paths it has on a Debian host:

- ``/etc`` is an overlay of this machine's ``/etc``: ``/etc/rsyslog.conf``
  is the package's file as shipped, ``/etc/rsyslog.d/`` holds the contrib
  snippet (and, from this machine's Postfix package, ``postfix.conf``, as
  on a Debian mail host);
- ``/dev`` (so ``/dev/log``), ``/var/log``, ``/var/spool`` and ``/run`` are
  the test's own directories, reachable from outside as ``root / "dev"``
  and so on;
- ``/proc/kmsg`` is ``/dev/null``: the stock imklog must not take this
  machine's kernel messages from whoever reads them.

With ``edit_imuxsock`` the operator's steps of the snippet's header run
first, verbatim (its ``sed`` of ``/etc/rsyslog.conf`` and ``rsyslogd
-N1``), so the test checks the instructions, not a copy of them.
"""

from __future__ import annotations

import grp
import os
import shlex
from pathlib import Path

from harness.logservers import RSYSLOG_MODULES, SyslogSink

REPO = Path(__file__).resolve().parents[1]
SNIPPET = REPO / "contrib" / "rsyslog" / "popauth-follow.conf"
LOG_NAME = "popauth-logins.log"
# The Postfix package's drop-in: a socket in the chroot of Postfix's daemons.
POSTFIX_DROP_IN = Path("/etc/rsyslog.d/postfix.conf")


def operator_steps() -> list[str]:
    """The shell commands the snippet tells the operator to run, but the restart."""
    steps = []
    for line in SNIPPET.read_text().splitlines():
        command = line.removeprefix("#   ")
        if command != line and command.split()[0] in ("sed", "rsyslogd"):
            steps.append(command)
    if not steps:
        raise AssertionError(f"{SNIPPET}: no operator steps found in its header")
    return steps


class StockRsyslog(SyslogSink):
    """rsyslogd -n with the package's own configuration, in a private mount namespace."""

    name = "the stock rsyslogd"

    def __init__(self, root: Path, package_root: Path, *, edit_imuxsock: bool) -> None:
        self.root = root
        self.package_root = package_root
        self.edit_imuxsock = edit_imuxsock
        self.log_dir = root / "log"
        self.log_path = self.log_dir / LOG_NAME
        self.socket_path = root / "dev" / "log"
        # Postfix's chrooted daemons log here (the Postfix package's drop-in).
        self.postfix_socket_path = root / "spool" / "postfix" / "dev" / "log"
        self.check_output = root / "check.out"

    @property
    def rsyslogd(self) -> str:
        return f"{self.package_root}/usr/sbin/rsyslogd -M {self.package_root / RSYSLOG_MODULES}"

    @property
    def output_path(self) -> Path:
        return self.root / "rsyslogd.out"

    def prepare(self) -> None:
        etc = self.root / "etc-up"
        (etc / "rsyslog.d").mkdir(parents=True, exist_ok=True)
        (self.root / "etc-work").mkdir(exist_ok=True)
        (etc / "rsyslog.conf").write_bytes((self.package_root / "etc/rsyslog.conf").read_bytes())
        (etc / "rsyslog.d" / "10-popauth-follow.conf").write_bytes(SNIPPET.read_bytes())
        for part in ("log", "spool/rsyslog", "spool/postfix/dev", "run", "dev"):
            (self.root / part).mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        (self.root / "dev").chmod(0o755)
        self.log_dir.chmod(0o755)  # as Debian's /var/log: others enter, adm reads
        for name, (major, minor) in {
            "null": (1, 3),
            "zero": (1, 5),
            "random": (1, 8),
            "urandom": (1, 9),
        }.items():
            node = self.root / "dev" / name
            if not node.exists():
                os.mknod(node, 0o666 | 0o020000, os.makedev(major, minor))
                node.chmod(0o666)

    def _namespace_script(self, then: str) -> str:
        root = shlex.quote(str(self.root))
        steps = []
        if self.edit_imuxsock:
            for step in operator_steps():
                # The unpacked rsyslogd, with its modules, in place of the installed one.
                command = (
                    step.replace("rsyslogd", self.rsyslogd, 1)
                    if step.startswith("rsyslogd")
                    else step
                )
                steps.append(f"{command} >> {root}/check.out 2>&1")
        return "\n".join(
            [
                "set -e",
                f"mount -t overlay overlay -o lowerdir=/etc,upperdir={root}/etc-up,"
                f"workdir={root}/etc-work /etc",
                f"mount --bind {root}/log /var/log",
                f"mount --bind {root}/spool /var/spool",
                f"mount --bind {root}/dev /dev",
                f"mount --bind {root}/run /run",
                "mount --bind /dev/null /proc/kmsg",
                *steps,
                then,
            ]
        )

    def command(self) -> list[str]:
        return [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            self._namespace_script(f"exec {self.rsyslogd} -n"),
        ]

    def ready(self) -> bool:
        """The socket exists and a message sent to it is written (no chmod: the stock file's)."""
        if not self.socket_path.exists():
            return False
        self.sync()
        return True

    def text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def diagnostics(self) -> str:
        texts = []
        for name in ("check.out", "rsyslogd.out"):
            path = self.root / name
            if path.exists():
                texts.append(f"--- {name}\n{path.read_text(errors='replace')}")
        return "\n".join(texts)

    def checked(self) -> str:
        """What the operator's ``rsyslogd -N1`` said."""
        return self.check_output.read_text() if self.check_output.exists() else ""

    def errors(self) -> list[str]:
        """rsyslogd's own complaints about its configuration, at start."""
        out = self.root / "rsyslogd.out"
        text = out.read_text(errors="replace") if out.exists() else ""
        # imklog is blinded on purpose (/proc/kmsg is /dev/null, which a root
        # whose /dev is mounted nodev may not even open): not the snippet's doing.
        return [line for line in text.splitlines() if "rsyslogd:" in line and "imklog" not in line]


def adm_gid() -> int:
    return grp.getgrnam("adm").gr_gid
