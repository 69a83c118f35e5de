"""Local domains and the local mailer, as Sendmail itself reports them.

Sendmail's address test mode (``sendmail -bt -C sendmail.cf``) answers what
its rules really do: ``$=w`` lists class w (the host's own names, the
``LOCAL_DOMAIN``s and ``local-host-names``, with what Sendmail found out
about the host at start), ``$={VirtHost}`` the ``VIRTUSER_DOMAIN``s whose
mail the virtusertable delivers, and ``/parse postmaster`` the mailer a bare
local user is delivered with (``local``, unless e.g. a ``MAIL_HUB`` sends
local mail on).
"""

from __future__ import annotations

import os

from popauth.localdelivery import (
    Learned,
    LearnError,
    MtaNotFound,
    canonical_domain,
    is_domain_name,
    is_mailer_name,
)
from popauth.localdelivery.commands import CommandUnavailable, Runner, run_command

# The test-mode questions, in order; the answers follow prompts ("> ").
QUESTIONS = ("$=w", "$={VirtHost}", "/parse postmaster")
DOMAIN_CLASS_ORIGINS = ("sendmail class w", "sendmail class {VirtHost}")


def split_answers(output: str) -> list[list[str]]:
    """The lines printed after each ``> `` prompt of ``sendmail -bt``.

    The first block is the banner; each answer starts on its prompt's line.
    """
    answers: list[list[str]] = [[]]
    for raw_line in output.splitlines():
        line = raw_line
        while line.startswith("> "):
            answers.append([])
            line = line[2:]
        if line.strip():
            answers[-1].append(line.strip())
    return answers[1:]


def parsed_mailer(lines: list[str]) -> str | None:
    """``mailer local, user postmaster`` -> ``local``."""
    for line in lines:
        if line.startswith("mailer "):
            word = line[len("mailer ") :].split(",", 1)[0].strip().lower()
            return word if is_mailer_name(word) else None
    return None


def learn_from_sendmail(command: str, cf: str, run: Runner = run_command) -> Learned:
    """Class w, class {VirtHost} and the local mailer of ``cf``."""
    if not os.path.exists(cf):
        raise MtaNotFound(f"no Sendmail configuration at {cf}")
    if not os.access(command, os.X_OK):
        raise LearnError(f"{cf} exists, but {command} cannot be run; set sendmail_command")
    stdin = "".join(f"{question}\n" for question in QUESTIONS)
    try:
        result = run([command, "-bt", "-C", cf], stdin)
    except CommandUnavailable as problem:
        raise LearnError(str(problem)) from None
    answers = split_answers(result.stdout)
    if result.returncode != 0 or len(answers) < len(QUESTIONS):
        raise LearnError(f"{command} -bt -C {cf} failed: {result.error_text()}")
    learned = Learned(f"sendmail ({command} -bt -C {cf})")
    for origin, lines in zip(DOMAIN_CLASS_ORIGINS, answers, strict=False):
        for line in lines:
            if is_domain_name(line):
                learned.add_domain(canonical_domain(line), origin)
    mailer = parsed_mailer(answers[2])
    if mailer is None:
        raise LearnError(
            f"{command} -bt did not say which mailer delivers to postmaster: "
            f"{' / '.join(answers[2][-2:])}; set local_mailers"
        )
    learned.add_mailer(mailer, "sendmail ruleset parse (/parse postmaster)")
    return learned
