"""``popauth report``: the REPORT reply as rows, and the dry run of a retirement.

``popauth report --retire-at DATE`` asks who would be refused if POP-first
were retired on DATE (``pop_first_retire_at``), from what the usage ledger
has seen: every user who relayed by POP first in the last ``days`` days is
either exempt, graduated (``pop_first_graduate`` refuses them already),
switched (relayed by SMTP AUTH after their last POP-first relay) or would
be refused. The message counts are the ledger's totals for those users.

Standard library only, like every client command.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

DAY = 86_400


class Standing(enum.Enum):
    """Where one user of POP first stands if it were retired."""

    REFUSED = "refused"
    EXEMPT = "exempt"
    GRADUATED = "graduated"
    SWITCHED = "switched"


def report_rows(lines: Iterable[str]) -> list[dict[str, str]]:
    """REPORT's ``key=value`` lines as rows, the values as sent."""
    return [dict(word.split("=", 1) for word in line.split() if "=" in word) for line in lines]


def _number(row: dict[str, str], key: str) -> int:
    try:
        return int(row.get(key, "0"))
    except ValueError:
        return 0


def standing(row: dict[str, str]) -> Standing:
    if row.get("exempt") == "yes":
        return Standing.EXEMPT
    if _number(row, "graduated") and not _number(row, "reinstated"):
        return Standing.GRADUATED
    if _number(row, "auth_last_seen") >= _number(row, "pop_last_seen"):
        return Standing.SWITCHED
    return Standing.REFUSED


@dataclass(frozen=True, slots=True)
class DryRun:
    retire_at: float
    now: float
    days: int
    groups: dict[Standing, list[dict[str, str]]] = field(default_factory=dict)

    @property
    def users(self) -> int:
        return sum(len(rows) for rows in self.groups.values())

    def messages(self, *standings: Standing) -> int:
        return sum(
            _number(row, "pop_messages")
            for which in standings or tuple(Standing)
            for row in self.groups.get(which, [])
        )

    @property
    def refused_share(self) -> float:
        total = self.messages()
        return self.messages(Standing.REFUSED) / total if total else 0.0


def dry_run(rows: list[dict[str, str]], retire_at: float, now: float, days: int) -> DryRun:
    """Those of ``rows`` who relayed by POP first within ``days`` of ``now``, by standing."""
    since = now - days * DAY
    groups: dict[Standing, list[dict[str, str]]] = {which: [] for which in Standing}
    for row in rows:
        if _number(row, "pop_messages") and _number(row, "pop_last_seen") >= since:
            groups[standing(row)].append(row)
    return DryRun(retire_at, now, days, groups)
