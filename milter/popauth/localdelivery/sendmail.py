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
from collections.abc import Sequence

from popauth.localdelivery import (
    LearnedClass,
    LearnError,
    LocalDelivery,
    MtaNotFound,
    canonical_domain,
    configured_class,
    first_origins,
    is_domain_name,
    is_mailer_name,
)
from popauth.localdelivery.commands import CommandRunner, CommandUnavailable, Runner
from popauth.relay.recipients import DeliveryClass, DomainSet

# The test-mode questions, in order; the answers follow prompts ("> ").
QUESTIONS = ("$=w", "$={VirtHost}", "/parse postmaster")
# (class, heading, whether a bare local user is delivered by it)
DOMAIN_CLASSES = (
    ("sendmail class w", "local: sendmail class w (exact names)", True),
    ("sendmail class {VirtHost}", "virtual: sendmail class {VirtHost} (exact names)", False),
)


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


def learn_from_sendmail(
    command: str,
    cf: str,
    run: Runner | None = None,
    configured_domains: Sequence[str] | None = None,
) -> LocalDelivery:
    """Class w, class {VirtHost} and the local mailer of ``cf``.

    With ``configured_domains``, one class of those domains with that mailer.
    """
    if not os.path.exists(cf):
        raise MtaNotFound(f"no Sendmail configuration at {cf}")
    if not os.access(command, os.X_OK):
        raise LearnError(f"{cf} exists, but {command} cannot be run; set sendmail_command")
    stdin = "".join(f"{question}\n" for question in QUESTIONS)
    try:
        runner = run if run is not None else CommandRunner()
        result = runner.run([command, "-bt", "-C", cf], stdin)
    except CommandUnavailable as problem:
        raise LearnError(str(problem)) from None
    answers = split_answers(result.stdout)
    if result.returncode != 0 or len(answers) < len(QUESTIONS):
        raise LearnError(f"{command} -bt -C {cf} failed: {result.error_text()}")
    mailer = parsed_mailer(answers[2])
    if mailer is None:
        raise LearnError(
            f"{command} -bt did not say which mailer delivers to postmaster: "
            f"{' / '.join(answers[2][-2:])}; set local_mailers"
        )
    mailers = ((mailer, "sendmail ruleset parse (/parse postmaster)"),)
    source = f"sendmail ({command} -bt -C {cf})"
    if configured_domains is not None:
        return LocalDelivery((configured_class(configured_domains, mailers),), source)
    classes = []
    for (origin, heading, bare), lines in zip(DOMAIN_CLASSES, answers, strict=False):
        domains = first_origins(
            (canonical_domain(line), origin) for line in lines if is_domain_name(line)
        )
        if not domains and not bare:
            continue
        rule = DeliveryClass(
            name=origin,
            domains=DomainSet.of(domain for domain, _ in domains),
            mailers=frozenset({mailer}),
            bare_local_parts=bare,
        )
        classes.append(LearnedClass(rule, heading, domains, mailers))
    return LocalDelivery(tuple(classes), source)
