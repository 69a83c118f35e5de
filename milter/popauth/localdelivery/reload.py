"""Learn local delivery again (SIGHUP) and swap the gate's relay policy whole.

The reload runs in the lifecycle's reload thread; ``cancel`` (at stop) kills
the MTA tool it waits on and keeps it from swapping anything afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import structlog

from popauth.localdelivery import LocalDelivery
from popauth.localdelivery.commands import CommandRunner, Runner
from popauth.localdelivery.resolve import LearnSettings, LocalDeliveryError, resolve_local_delivery
from popauth.relay.decision import RelayPolicy


class PolicyHolder(Protocol):
    """Where the live policy is: the relay gate."""

    def replace_policy(self, policy: RelayPolicy) -> None: ...


def log_local_delivery(
    log: structlog.typing.FilteringBoundLogger, event: str, local: LocalDelivery
) -> None:
    log.info(
        event,
        source=local.source or "configured",
        delivery_classes=[learned.heading for learned in local.classes],
        local_mailers=[f"{mailer} ({origin})" for mailer, origin in local.mailers],
        local_domains=[f"{domain} ({origin})" for domain, origin in local.domains],
    )


class LocalDeliveryReloader:
    """A reload callable: re-learn; on success swap the policy, else keep the old one.

    A reload that cannot learn changes nothing: the gate keeps deciding with
    what it had, and the error is logged.
    """

    def __init__(
        self,
        settings: LearnSettings,
        gate: PolicyHolder,
        build_policy: Callable[[LocalDelivery], RelayPolicy],
        log: structlog.typing.FilteringBoundLogger,
        *,
        resolve: Callable[[LearnSettings, Runner], LocalDelivery] = resolve_local_delivery,
        runner: CommandRunner | None = None,
    ) -> None:
        self._settings = settings
        self._gate = gate
        self._build_policy = build_policy
        self._log = log
        self._resolve = resolve
        self._runner = runner if runner is not None else CommandRunner()

    def __call__(self) -> None:
        self.reload()

    def cancel(self) -> None:
        """popauth is stopping: kill the tool a reload waits on; swap nothing more."""
        self._runner.cancel()

    def reload(self) -> bool:
        """True when the policy was replaced."""
        try:
            local = self._resolve(self._settings, self._runner)
            # The policy re-reads the users' extra addresses too.
            policy = self._build_policy(local)
        except LocalDeliveryError as problem:
            if self._runner.cancelled:
                self._log.info("local_delivery_reload_cancelled", error=str(problem))
                return False
            self._log.error("local_delivery_not_reloaded", error=str(problem))
            return False
        except Exception:
            self._log.exception("local_delivery_not_reloaded")
            return False
        if self._runner.cancelled:
            return False
        self._gate.replace_policy(policy)
        log_local_delivery(self._log, "local_delivery_reloaded", local)
        return True
