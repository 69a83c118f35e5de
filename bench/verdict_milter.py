"""A minimal pymilter milter with popauth's verdicts, for B2.

``python -m bench.verdict_milter SPEC WHITELIST_FILE LOCAL_DOMAIN``: the
whitelist is a file of client addresses, one a line, read once at start.
A client on it may relay; anyone may send to the local domain; any other
recipient gets ``550 5.7.1 Relaying denied.`` at RCPT. No store, no log, no
metrics, no SMTP AUTH: the least a milter can do to give the same verdicts
as popauth in B2's mix, written the plain pymilter way (``Milter.Base``,
``envrcpt``, ``setreply``), as a first milter would be.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import Milter


class VerdictMilter(Milter.Base):  # type: ignore[misc]
    whitelist: frozenset[str] = frozenset()
    local_domain = ""

    def __init__(self) -> None:
        self.client = ""

    def negotiate(self, opts: list[int]) -> int:
        _, offered_protocol, _, _ = opts
        opts[0] = 0
        opts[1] = offered_protocol & ~self.protocol_mask()
        opts[2] = 0
        opts[3] = 0
        return int(Milter.CONTINUE)

    def connect(self, hostname: str, family: int, hostaddr: object) -> int:
        if isinstance(hostaddr, tuple) and hostaddr:
            self.client = str(hostaddr[0])
        return int(Milter.CONTINUE)

    def envfrom(self, sender: str, *parameters: str) -> int:
        return int(Milter.CONTINUE)

    def envrcpt(self, recipient: str, *parameters: str) -> int:
        domain = recipient.strip("<>").rpartition("@")[2].lower()
        if self.client in self.whitelist or domain == self.local_domain:
            return int(Milter.CONTINUE)
        self.setreply("550", "5.7.1", "Relaying denied.")
        return int(Milter.REJECT)

    def eom(self) -> int:
        return int(Milter.CONTINUE)

    def abort(self) -> int:
        return int(Milter.CONTINUE)

    def close(self) -> int:
        return int(Milter.CONTINUE)


def main(argv: list[str]) -> int:
    spec, whitelist_file, local_domain = argv
    VerdictMilter.whitelist = frozenset(Path(whitelist_file).read_text().split())
    VerdictMilter.local_domain = local_domain.lower()
    Milter.factory = VerdictMilter
    # smtpd runs as postfix: the socket libmilter makes must be writable by it.
    os.umask(0)
    Milter.runmilter("verdicts", spec, timeout=600)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
