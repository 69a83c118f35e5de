"""A no-op pymilter milter: the baseline for B1 (``python -m bench.noop_milter SPEC``).

It negotiates the same callbacks as popauth (connect, envfrom, envrcpt; no
HELO, headers, EOH, body, DATA or unknown commands), goes through the same
pymilter layers (``Milter.Base``, ``envfrom_bytes``/``envrcpt_bytes``) and
answers CONTINUE to everything. Whatever popauth costs beyond this is its own
work: the decision, the whitelist lookup, the logging.
"""

from __future__ import annotations

import sys

import Milter


class NoopMilter(Milter.Base):  # type: ignore[misc]
    def negotiate(self, opts: list[int]) -> int:
        _, offered_protocol, _, _ = opts
        opts[0] = 0  # no actions, no SETSYMLIST: nothing to change
        opts[1] = offered_protocol & ~self.protocol_mask()
        opts[2] = 0
        opts[3] = 0
        return int(Milter.CONTINUE)

    def connect(self, hostname: str, family: int, hostaddr: object) -> int:
        return int(Milter.CONTINUE)

    def envfrom(self, sender: str, *parameters: str) -> int:
        return int(Milter.CONTINUE)

    def envrcpt(self, recipient: str, *parameters: str) -> int:
        return int(Milter.CONTINUE)

    def eom(self) -> int:
        return int(Milter.CONTINUE)

    def abort(self) -> int:
        return int(Milter.CONTINUE)

    def close(self) -> int:
        return int(Milter.CONTINUE)


def main(argv: list[str]) -> int:
    spec = argv[0]
    Milter.factory = NoopMilter
    Milter.runmilter("noop", spec, timeout=600)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
