"""The soak, bounded: seconds of SMTP sessions through real Postfix while logins,
revokes, blocks and expiries churn, and not one verdict differs from the oracle's.

The workers and the oracle are ``harness/soak.py``; ``make bench`` runs the
same soak for minutes (the ``soak`` benchmark).
"""

from __future__ import annotations

import pytest

from harness.postfix import PostfixInstance
from harness.soak import TTL, WORKERS, Oracle, Tally, run_workers, total
from tests.live.conftest import PopauthFactory

pytestmark = pytest.mark.live

SECONDS = 12.0


def test_every_verdict_of_a_churning_soak_is_the_oracles(
    postfix: PostfixInstance, start_popauth: PopauthFactory
) -> None:
    popauth = start_popauth(ttl=TTL, log_level="warning")
    oracles = [Oracle() for _ in range(WORKERS)]
    tallies = [Tally() for _ in range(WORKERS)]
    run_workers(popauth, postfix.smtp_port, SECONDS, oracles, tallies)
    summed = total(tallies)
    assert summed.wrong == 0, summed.wrong_examples
    assert popauth.process is not None
    assert popauth.process.poll() is None, "popauth died during the soak"
    # The run judged enough of every kind to mean something: relayed and
    # refused sessions, and each kind of churn (ttl 2 s: several expiries).
    assert summed.judged >= 100, summed
    assert summed.judged_accepted >= 10, summed
    assert summed.judged_refused >= 10, summed
    assert summed.logins >= 20, summed
    assert summed.refused_logins >= 1, summed
    assert min(summed.revokes, summed.blocks, summed.unblocks) >= 1, summed
