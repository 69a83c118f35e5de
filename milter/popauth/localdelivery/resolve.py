"""The effective local domains and mailers: configured ones win, the rest is learned."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from popauth.localdelivery import Learned, LearnError, LocalDelivery, MtaNotFound
from popauth.localdelivery.commands import Runner, run_command
from popauth.localdelivery.postfix import learn_from_postfix
from popauth.localdelivery.sendmail import learn_from_sendmail

LEARN_CHOICES = ("auto", "postfix", "sendmail", "none")
_KEYS_HINT = (
    "set local_domains and local_mailers in the settings file (e.g. local_domains ="
    ' ["example.org"], local_mailers = ["local"]), or point postfix_config_directory'
    " or sendmail_cf at the MTA's configuration"
)


class LocalDeliveryError(Exception):
    """Nothing says which mail is delivered here: popauth must not start."""


class LearnSettings(Protocol):
    """What ``resolve_local_delivery`` needs from the settings."""

    @property
    def local_domains(self) -> tuple[str, ...] | None: ...
    @property
    def local_mailers(self) -> tuple[str, ...] | None: ...
    @property
    def learn_from_mta(self) -> str: ...
    @property
    def postfix_config_directory(self) -> str: ...
    @property
    def sendmail_cf(self) -> str: ...
    @property
    def sendmail_command(self) -> str: ...


def learn_from_mta(
    settings: LearnSettings, configured_domains: Sequence[str] | None, run: Runner
) -> tuple[Learned | None, list[str]]:
    """Ask the chosen MTA; None and the reasons when there is none to ask."""
    choice = settings.learn_from_mta
    absent: list[str] = []
    if choice in ("auto", "postfix"):
        try:
            return learn_from_postfix(
                settings.postfix_config_directory, configured_domains, run
            ), absent
        except MtaNotFound as reason:
            if choice == "postfix" or settings.postfix_config_directory:
                raise LearnError(str(reason)) from None
            absent.append(str(reason))
    if choice in ("auto", "sendmail"):
        try:
            return learn_from_sendmail(settings.sendmail_command, settings.sendmail_cf, run), absent
        except MtaNotFound as reason:
            if choice == "sendmail":
                raise LearnError(str(reason)) from None
            absent.append(str(reason))
    if choice == "none":
        absent.append('learn_from_mta = "none"')
    return None, absent


def resolve_local_delivery(settings: LearnSettings, run: Runner = run_command) -> LocalDelivery:
    """Configured lists as they are; absent ones learned from the MTA.

    Raises LocalDeliveryError, naming the keys to set, when a list is neither
    configured nor learned: popauth would otherwise refuse every inbound message.
    """
    domains_set = settings.local_domains is not None
    mailers_set = settings.local_mailers is not None
    configured = LocalDelivery.configured(
        settings.local_domains or (), settings.local_mailers or ()
    )
    if domains_set and mailers_set:
        return configured
    try:
        learned, absent = learn_from_mta(settings, settings.local_domains, run)
    except LearnError as problem:
        raise LocalDeliveryError(
            f"cannot learn local delivery from the MTA: {problem}"
            " (setting both local_domains and local_mailers does without it)"
        ) from None
    if learned is None:
        keys = (("local_domains", domains_set), ("local_mailers", mailers_set))
        missing = [key for key, is_set in keys if not is_set]
        raise LocalDeliveryError(
            f"{' and '.join(missing)} not set, and there is no MTA to learn them from "
            f"({'; '.join(absent)}): {_KEYS_HINT}"
        )
    domains = configured.domains if domains_set else tuple(learned.domains.items())
    mailers = configured.mailers if mailers_set else tuple(learned.mailers.items())
    if not domains and not domains_set:
        raise LocalDeliveryError(
            f"{learned.mta} delivers no domain here, so every inbound message would be "
            f"refused: set local_domains"
        )
    if not mailers:
        raise LocalDeliveryError(f"{learned.mta} names no local transport: set local_mailers")
    return LocalDelivery(domains, mailers, learned.mta)
