"""The SMTP replies: one definition for the milter and for explain."""

from __future__ import annotations

from popauth.relay.decision import (
    ACCEPT_LOCAL,
    REJECT_POP_FIRST_RETIRED,
    REJECT_RELAY,
    TEMPFAIL_UNAVAILABLE,
)
from popauth.relay.replies import Replies


def test_each_refusal_has_its_reply_and_an_accept_has_none() -> None:
    replies = Replies("Use SMTP AUTH.", "Retired.")
    assert replies.refusal(ACCEPT_LOCAL) is None
    assert str(replies.refusal(REJECT_RELAY)) == "550 5.7.1 Relaying denied. Use SMTP AUTH."
    assert str(replies.refusal(REJECT_POP_FIRST_RETIRED)) == "550 5.7.1 Relaying denied. Retired."
    assert str(replies.refusal(TEMPFAIL_UNAVAILABLE)) == (
        "451 4.3.0 Relay check unavailable, try again later"
    )


def test_an_empty_explanation_leaves_no_trailing_blank() -> None:
    assert str(Replies("", "").refusal(REJECT_RELAY)) == "550 5.7.1 Relaying denied."
