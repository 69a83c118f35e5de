"""The effective local domains and mailers: configured ones win, the rest is learned."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

from popauth.basics.errors import ConfigError
from popauth.localdelivery import LearnedClass, LearnError, LearnFrom, LocalDelivery, MtaNotFound
from popauth.localdelivery.commands import Runner
from popauth.localdelivery.postfix import learn_from_postfix
from popauth.localdelivery.sendmail import learn_from_sendmail

_KEYS_HINT = (
    "set local_domains and local_mailers in the settings file (e.g. local_domains ="
    ' ["example.org"], local_mailers = ["local"]), or point postfix_config_directory'
    " or sendmail_cf at the MTA's configuration"
)


class LocalDeliveryError(ConfigError):
    """Nothing says which mail is delivered here: popauth must not start."""


class LearnSettings(Protocol):
    """What ``resolve_local_delivery`` needs from the settings."""

    @property
    def local_domains(self) -> tuple[str, ...] | None: ...
    @property
    def local_mailers(self) -> tuple[str, ...] | None: ...
    @property
    def learn_from_mta(self) -> LearnFrom: ...
    @property
    def postfix_config_directory(self) -> str | None: ...
    @property
    def sendmail_cf(self) -> str: ...
    @property
    def sendmail_command(self) -> str: ...


def learn_from_mta(
    settings: LearnSettings, configured_domains: Sequence[str] | None, run: Runner | None
) -> tuple[LocalDelivery | None, list[str]]:
    """Ask the chosen MTA; None and the reasons when there is none to ask."""
    choice = settings.learn_from_mta
    absent: list[str] = []
    if choice in (LearnFrom.AUTO, LearnFrom.POSTFIX):
        try:
            learned = learn_from_postfix(
                settings.postfix_config_directory,
                configured_domains,
                run,
                with_transport_maps=settings.local_mailers is None,
            )
            return learned, absent
        except MtaNotFound as reason:
            if choice is LearnFrom.POSTFIX or settings.postfix_config_directory:
                raise LearnError(str(reason)) from None
            absent.append(str(reason))
    if choice in (LearnFrom.AUTO, LearnFrom.SENDMAIL):
        try:
            learned = learn_from_sendmail(
                settings.sendmail_command, settings.sendmail_cf, run, configured_domains
            )
            return learned, absent
        except MtaNotFound as reason:
            if choice is LearnFrom.SENDMAIL:
                raise LearnError(str(reason)) from None
            absent.append(str(reason))
    if choice is LearnFrom.NONE:
        absent.append('learn_from_mta = "none"')
    return None, absent


def resolve_local_delivery(settings: LearnSettings, run: Runner | None = None) -> LocalDelivery:
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
    if mailers_set:
        learned = with_mailers(learned, configured.classes[0])
    if not domains_set and not any(each.has_domains() for each in learned.classes):
        raise LocalDeliveryError(
            f"{learned.source} delivers no domain here, so every inbound message would be "
            f"refused: set local_domains"
        )
    if not any(learned_class.rule.mailers for learned_class in learned.classes):
        raise LocalDeliveryError(f"{learned.source} names no local transport: set local_mailers")
    return learned


def with_mailers(learned: LocalDelivery, configured: LearnedClass) -> LocalDelivery:
    """The learned classes, each delivered by the configured mailers (and no routes)."""
    classes = tuple(
        dataclasses.replace(
            learned_class,
            rule=dataclasses.replace(
                learned_class.rule, mailers=configured.rule.mailers, routes=None
            ),
            mailers=configured.mailers,
        )
        for learned_class in learned.classes
    )
    return LocalDelivery(classes, learned.source)
