"""The notice's text: an operator-editable template, checked whole when the settings load.

The file starts with its headers block (``Subject:`` only; popauth writes the
others), then a blank line and the body. Placeholders are ``{name}`` as in
:meth:`str.format` (a literal brace is doubled: ``{{``); only the names in
:data:`PLACEHOLDERS` exist, and any other, a ``{user.attribute}``, a
conversion or a format spec is refused with a one-line reason, so that a
typo stops popauth at start instead of mailing users a broken text.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from popauth.basics.errors import InputError

PLACEHOLDERS = ("user", "date", "days_left", "smtp_auth_instructions")
HEADERS = ("Subject",)
DEFAULT_SMTP_AUTH_INSTRUCTIONS = (
    "In the settings of the outgoing (SMTP) server, turn on authentication with the same"
    " user name and password as for reading mail, port 587 with STARTTLS."
)

DEFAULT_TEMPLATE = """\
Subject: POP before SMTP ends {date}: please turn on SMTP AUTH

Hello {user},

your mail program still sends mail through our server by "POP before
SMTP": it checks your mailbox first, and our server lets it send because
of that check. This old way of sending ends {date} ({days_left} days
left); after that, mail sent so is refused.

To keep sending mail, turn on authentication for outgoing mail (SMTP
AUTH) in your mail program:

{smtp_auth_instructions}

Reading mail does not change. This message was sent automatically to
each user whose mail program sent mail the old way recently.
"""


class TemplateError(InputError):
    """The template cannot be used; the message says why, in one line."""


@dataclass(frozen=True, slots=True)
class NoticeTemplate:
    subject: str
    body: str

    def render(self, values: Mapping[str, str]) -> tuple[str, str]:
        """``(subject, body)`` with the placeholders filled in."""
        subject = self.subject.format_map(values)
        # A value with a line break would end the header early.
        return " ".join(subject.split()), self.body.format_map(values)


def parse_template(text: str) -> NoticeTemplate:
    """A template from its text; raises TemplateError saying what is wrong."""
    head, blank, body = text.replace("\r\n", "\n").partition("\n\n")
    if not blank:
        raise TemplateError("no blank line between the Subject: header and the body")
    headers: dict[str, str] = {}
    for line in head.split("\n"):
        name, colon, value = line.partition(":")
        if not colon or name.strip() not in HEADERS:
            raise TemplateError(
                f"header line {line!r} is not one of {', '.join(h + ':' for h in HEADERS)}"
            )
        headers[name.strip()] = value.strip()
    subject = headers.get("Subject", "")
    if not subject:
        raise TemplateError("the Subject: header is empty")
    for part in (subject, body):
        _check_placeholders(part)
    return NoticeTemplate(subject, body)


def _check_placeholders(text: str) -> None:
    try:
        fields = [
            (name, conversion, spec)
            for _, name, spec, conversion in string.Formatter().parse(text)
            if name is not None
        ]
    except ValueError as error:
        raise TemplateError(f"{error} (a literal brace is written twice: {{{{ or }}}})") from None
    known = ", ".join("{" + name + "}" for name in PLACEHOLDERS)
    for name, conversion, spec in fields:
        if name not in PLACEHOLDERS:
            raise TemplateError(f"unknown placeholder {{{name}}}; known: {known}")
        if conversion or spec:
            raise TemplateError(f"placeholder {{{name}}} takes no conversion or format")


def read_template(path: Path | None) -> NoticeTemplate:
    """The template in ``path``, or the default one; raises TemplateError."""
    if path is None:
        return parse_template(DEFAULT_TEMPLATE)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise TemplateError(f"cannot read {path}: {error}") from None
    return parse_template(text)
