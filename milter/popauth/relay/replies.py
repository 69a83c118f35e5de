"""The SMTP replies popauth has the MTA send, once for the milter and ``explain``.

Pure: no pymilter. The adapter hands these to libmilter's ``setreply``;
``popauth explain`` prints them, so an operator reads the very text a
refused client got.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from popauth.relay.decision import Decision, Reason, Verdict


@dataclass(frozen=True, slots=True)
class SmtpReply:
    code: str
    status: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}"


# A refusal the MTA may retry: the whitelist could not be read.
UNAVAILABLE = SmtpReply("451", "4.3.0", "Relay check unavailable, try again later")
# A callback broke: fail closed, with a temporary failure.
CHECK_FAILED = SmtpReply("451", "4.3.0", "Relay check failed, try again later")


DEFAULT_SENDER_NOT_OWNED = (
    "Sender address is not yours: check your mail (POP/IMAP) with the account"
    " that owns it, or turn on SMTP AUTH."
)
DEFAULT_NULL_SENDER = "A null sender (<>) may not relay by a POP/IMAP login: turn on SMTP AUTH."
DEFAULT_POP_FIRST_GRADUATED = (
    "Your mail program already uses SMTP AUTH for this account: turn it on here too,"
    " or ask your postmaster to let this one send without it."
)
DEFAULT_BUDGET_SPENT = (
    "Too many recipients for a POP/IMAP login: try again later, or turn on SMTP AUTH."
)


@dataclass(frozen=True, slots=True)
class Replies:
    """The texts after ``550 5.7.1 Relaying denied.``, the whole texts
    after ``550 5.7.1`` of the sender refusals (``pop_first_sender = "own"``),
    and the whole text after ``451 4.7.1`` of a spent relay budget."""

    reject: str
    pop_first_retired: str
    sender_not_owned: str = DEFAULT_SENDER_NOT_OWNED
    null_sender: str = DEFAULT_NULL_SENDER
    pop_first_graduated: str = DEFAULT_POP_FIRST_GRADUATED
    budget_spent: str = DEFAULT_BUDGET_SPENT
    # Built once: a refusal costs the milter no formatting per recipient.
    _denied: SmtpReply = field(init=False, repr=False, compare=False)
    _retired: SmtpReply = field(init=False, repr=False, compare=False)
    _not_owned: SmtpReply = field(init=False, repr=False, compare=False)
    _null: SmtpReply = field(init=False, repr=False, compare=False)
    _graduated: SmtpReply = field(init=False, repr=False, compare=False)
    _spent: SmtpReply = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_denied", _relaying_denied(self.reject))
        object.__setattr__(self, "_retired", _relaying_denied(self.pop_first_retired))
        object.__setattr__(self, "_not_owned", SmtpReply("550", "5.7.1", self.sender_not_owned))
        object.__setattr__(self, "_null", SmtpReply("550", "5.7.1", self.null_sender))
        object.__setattr__(self, "_graduated", _relaying_denied(self.pop_first_graduated))
        # 4.7.1: a policy refusal, to be retried once the window has passed.
        object.__setattr__(self, "_spent", SmtpReply("451", "4.7.1", self.budget_spent))

    def refusal(self, decision: Decision) -> SmtpReply | None:
        """What the MTA answers for a refused recipient; None when popauth accepts."""
        if decision.verdict is Verdict.ACCEPT:
            return None
        if decision.verdict is Verdict.TEMPFAIL:
            return self._spent if decision.reason is Reason.BUDGET_SPENT else UNAVAILABLE
        if decision.reason is Reason.POP_FIRST_RETIRED:
            return self._retired
        if decision.reason is Reason.SENDER_NOT_OWNED:
            return self._not_owned
        if decision.reason is Reason.NULL_SENDER:
            return self._null
        if decision.reason is Reason.POP_FIRST_GRADUATED:
            return self._graduated
        return self._denied


def _relaying_denied(explanation: str) -> SmtpReply:
    return SmtpReply("550", "5.7.1", f"Relaying denied. {explanation}".rstrip())
