"""Postfix's own answer for a recipient: its trivial-rewrite daemon, run stand-alone.

smtpd asks trivial-rewrite twice for every RCPT (rewrite the address in the
"local" context, then resolve it) and sends the milter the answer as
``{rcpt_mailer}`` (the transport) and ``{rcpt_addr}`` (the recipient);
``reject_unauth_destination`` lets a stranger's recipient through exactly
when the resolved address class is not the default one. ``trivial-rewrite
-S`` serves one such request on stdin/stdout in Postfix's attribute
protocol (``name NUL value NUL``..., ``NUL``), with the configuration that
``MAIL_CONFIG`` names: the very code that classifies mail on a real host,
without a master process.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

# resolve_clnt.h
RESOLVE_FLAG_ERROR = 1 << 2
RESOLVE_FLAG_FAIL = 1 << 3
RESOLVE_CLASS_LOCAL = 1 << 8
RESOLVE_CLASS_ALIAS = 1 << 9
RESOLVE_CLASS_VIRTUAL = 1 << 10
RESOLVE_CLASS_RELAY = 1 << 11
RESOLVE_CLASS_DEFAULT = 1 << 12
DELIVERED_HERE = RESOLVE_CLASS_LOCAL | RESOLVE_CLASS_ALIAS | RESOLVE_CLASS_VIRTUAL
INBOUND = DELIVERED_HERE | RESOLVE_CLASS_RELAY
TIMEOUT = 20.0


class TrivialRewriteMissing(RuntimeError):
    pass


def daemon_path() -> Path:
    """Where Postfix keeps its daemons (``postconf -dh daemon_directory``)."""
    try:
        directory = subprocess.run(
            ["postconf", "-dh", "daemon_directory"],
            capture_output=True,
            text=True,
            check=True,
            timeout=TIMEOUT,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as problem:
        raise TrivialRewriteMissing(
            f"postconf cannot be run ({problem}): install postfix (scripts/bootstrap test)"
        ) from None
    path = Path(directory) / "trivial-rewrite"
    if not os.access(path, os.X_OK):
        raise TrivialRewriteMissing(f"{path} is missing: install postfix (scripts/bootstrap test)")
    return path


@dataclass(frozen=True)
class Resolution:
    transport: str
    nexthop: str
    recipient: str
    flags: int

    @property
    def failed(self) -> bool:
        """A table lookup failed: smtpd defers the RCPT before any milter."""
        return bool(self.flags & RESOLVE_FLAG_FAIL)

    @property
    def inbound(self) -> bool:
        """What reject_unauth_destination permits: any class but the default one."""
        failed = self.flags & (RESOLVE_FLAG_ERROR | RESOLVE_FLAG_FAIL)
        return bool(self.flags & INBOUND) and not failed


class TrivialRewrite:
    def __init__(self, config_directory: Path) -> None:
        self.config_directory = config_directory
        self.path = daemon_path()

    def _ask(self, *attributes: tuple[str, str]) -> list[tuple[str, str]]:
        request = b"".join(f"{name}\0{value}\0".encode() for name, value in attributes) + b"\0"
        completed = subprocess.run(
            [str(self.path), "-S"],
            input=request,
            capture_output=True,
            env={**os.environ, "MAIL_CONFIG": str(self.config_directory)},
            timeout=TIMEOUT,
            check=False,
        )
        fields = completed.stdout.split(b"\0")
        if completed.returncode != 0 or len(fields) < 3:
            raise RuntimeError(
                f"trivial-rewrite -S failed ({completed.returncode}) for {attributes!r}:"
                f" {completed.stdout!r} {completed.stderr!r}"
            )
        pairs = []
        for index in range(0, len(fields) - 1, 2):
            if not fields[index]:
                break
            pairs.append((fields[index].decode(), fields[index + 1].decode()))
        return pairs

    def rewrite_local(self, address: str) -> str:
        reply = dict(self._ask(("request", "rewrite"), ("rule", "local"), ("address", address)))
        return reply["address"]

    def resolve(self, address: str) -> Resolution:
        """As smtpd resolves a RCPT: rewritten in the local context, then resolved."""
        rewritten = self.rewrite_local(address)
        reply = self._ask(("request", "resolve"), ("sender", ""), ("address", rewritten))
        values = dict(reply)
        # The reply carries "flags" twice: the server's, then the resolver's.
        flags = int([value for name, value in reply if name == "flags"][-1])
        return Resolution(
            values["transport"], values["nexthop"], values["recipient"].lower(), flags
        )
