"""A notice as a mail, and its submission through the MTA's own ``sendmail`` command.

Postfix and Sendmail both provide ``sendmail -i -f SENDER -- RECIPIENT``
with the message on standard input: the notice is queued as any local
submission and delivered to the user's own mailbox. Never through the
milter's SMTP port: a local submission is not relayed mail.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

from popauth.basics.errors import UnavailableError
from popauth.basics.usernames import is_valid_user_name
from popauth.localdelivery.commands import kill_process_group
from popauth.notices.schedule import NoticeSchedule
from popauth.notices.template import NoticeTemplate
from popauth.relay.ownership import sender_address

# What a rejected submission says about itself, at most, in the log.
_STDERR_SHOWN = 300
# sendmail reads local line ends.
_MAIL_POLICY = policy.default.clone(linesep="\n")


def notice_address(user: str, domain: str | None) -> str | None:
    """The user's own address, by the rule that decides which senders are theirs
    (:mod:`popauth.relay.ownership`): a login that is an address is itself,
    ``joe`` is ``joe@`` the first local domain. None: no address can be made."""
    if not is_valid_user_name(user) or user.startswith("-"):
        return None
    if "@" in user:
        return user if sender_address(user) is not None and not user.startswith("<") else None
    return None if domain is None else f"{user}@{domain}"


def notice_values(
    user: str, schedule: NoticeSchedule, instructions: str, now: float
) -> dict[str, str]:
    """The template's placeholders for ``user`` at ``now``."""
    days = schedule.days_left(now)
    return {
        "user": user,
        "date": schedule.date_text(),
        # Without a date: "in some days".
        "days_left": "some" if days is None else str(days),
        "smtp_auth_instructions": instructions,
    }


@dataclass(frozen=True, slots=True)
class NoticeMail:
    """What every notice shares: who sends it and the text it is made from."""

    template: NoticeTemplate
    sender: str
    # Message-ID's right-hand side.
    domain: str

    def compose(self, recipient: str, values: Mapping[str, str], now: float) -> bytes:
        subject, body = self.template.render(values)
        message = EmailMessage(policy=_MAIL_POLICY)
        message["From"] = self.sender
        message["To"] = recipient
        message["Subject"] = subject
        message["Date"] = format_datetime(datetime.fromtimestamp(now, UTC))
        message["Message-ID"] = make_msgid(domain=self.domain)
        message["Auto-Submitted"] = "auto-generated"
        message.set_content(body, charset="utf-8")
        return message.as_bytes()


class SubmissionFailed(UnavailableError):
    """sendmail did not take the message: missing, non-zero exit or too slow."""


class Sendmail:
    """Runs ``command -i -f SENDER -- RECIPIENT`` under a timeout; :meth:`cancel` kills it."""

    def __init__(self, command: Sequence[str], timeout: float) -> None:
        self._command = tuple(command)
        self._timeout = timeout
        self._lock = threading.Lock()
        self._running: subprocess.Popen[bytes] | None = None
        self._cancelled = False

    def submit(self, sender: str, recipient: str, message: bytes) -> None:
        """Hand ``message`` over; raises SubmissionFailed saying why."""
        argv = [*self._command, "-i", "-f", sender, "--", recipient]
        with self._lock:
            if self._cancelled:
                raise SubmissionFailed("stopping")
            try:
                process = subprocess.Popen(
                    argv,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    close_fds=True,
                    # Its own process group: a kill reaches what it started too
                    # (Postfix's postdrop), which would hold the pipes open.
                    start_new_session=True,
                )
            except OSError as error:
                raise SubmissionFailed(f"cannot run {argv[0]}: {error.strerror}") from None
            self._running = process
        try:
            _, stderr = process.communicate(message, timeout=self._timeout)
        except subprocess.TimeoutExpired:
            kill_process_group(process)
            process.communicate()
            raise SubmissionFailed(f"{argv[0]} took longer than {self._timeout:g} s") from None
        finally:
            with self._lock:
                self._running = None
        if process.returncode != 0:
            said = stderr.decode("utf-8", "replace").strip()[:_STDERR_SHOWN]
            raise SubmissionFailed(f"{argv[0]} exited with {process.returncode}: {said}")

    def cancel(self) -> None:
        """Stop: kill a submission under way, refuse new ones."""
        with self._lock:
            self._cancelled = True
            if self._running is not None:
                kill_process_group(self._running)
