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


def test_the_sender_refusals_have_texts_of_their_own() -> None:
    from popauth.relay.decision import REJECT_NULL_SENDER, REJECT_SENDER_NOT_OWNED

    replies = Replies("Use SMTP AUTH.", "Retired.", "Not yours.", "No <> here.")
    assert str(replies.refusal(REJECT_SENDER_NOT_OWNED)) == "550 5.7.1 Not yours."
    assert str(replies.refusal(REJECT_NULL_SENDER)) == "550 5.7.1 No <> here."
    assert str(Replies("", "").refusal(REJECT_SENDER_NOT_OWNED)) == (
        "550 5.7.1 Sender address is not yours: check your mail (POP/IMAP) with the account"
        " that owns it, or turn on SMTP AUTH."
    )
