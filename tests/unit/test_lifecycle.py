"""The lifecycle in-process: start order, rollback in reverse, one stop path."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from popauth.daemon.lifecycle import Lifecycle, Step
from popauth.daemon.notify import NotifyError
from tests.support.logs import capturing_logger, events


class Journal:
    def __init__(self) -> None:
        self.entries: list[str] = []

    def step(self, name: str, *, fail_start: bool = False, fail_stop: bool = False) -> Step:
        def start() -> None:
            if fail_start:
                raise OSError(f"{name} cannot start")
            self.entries.append(f"start {name}")

        def stop() -> None:
            self.entries.append(f"stop {name}")
            if fail_stop:
                raise RuntimeError(f"{name} cannot stop")

        return Step(name, start, stop)


def test_a_start_failure_stops_what_started_in_reverse() -> None:
    log, sink = capturing_logger()
    told: list[str] = []

    def tell(state: str) -> bool:
        told.append(state)
        return True

    journal = Journal()
    steps = [
        journal.step("store"),
        journal.step("ingest"),
        journal.step("socketmap", fail_start=True),
        journal.step("milter"),
    ]
    with pytest.raises(OSError, match="socketmap cannot start"):
        Lifecycle(log, tell).run(steps)
    assert journal.entries == ["start store", "start ingest", "stop ingest", "stop store"]
    assert told == []  # never ready
    assert "start_failed" in events(sink)
    # The signals are handed back as they were.
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_sigterm_stops_everything_in_reverse_after_ready() -> None:
    log, sink = capturing_logger()
    journal = Journal()
    told: list[str] = []

    def ready(state: str) -> bool:
        told.append(state)
        if state == "READY=1":
            os.kill(os.getpid(), signal.SIGTERM)
        return True

    steps = [journal.step("store"), journal.step("ingest", fail_stop=True), journal.step("milter")]
    stopped = Lifecycle(log, ready).run(steps)
    assert stopped.reason == "SIGTERM" and stopped.clean
    assert told == ["READY=1", "STOPPING=1"]
    # A failing stop is logged and the others still run.
    assert journal.entries[3:] == ["stop milter", "stop ingest", "stop store"]
    assert "stop_failed" in events(sink)


def test_sighup_reloads_and_keeps_serving_until_sigint() -> None:
    log, sink = capturing_logger()
    lifecycle = Lifecycle(log, lambda state: True)
    reloads: list[int] = []

    def relearn() -> None:
        reloads.append(1)
        if len(reloads) == 1:
            os.kill(os.getpid(), signal.SIGHUP)  # a second reload follows
            raise ValueError("postconf failed")  # logged; the run goes on
        os.kill(os.getpid(), signal.SIGINT)

    lifecycle.on_reload("local delivery", relearn)

    def start() -> None:
        # Pending until the lifecycle takes the signals after the last start.
        os.kill(os.getpid(), signal.SIGHUP)

    stopped = lifecycle.run([Step("probe", start, lambda: None)])
    assert stopped.reason == "SIGINT"
    assert len(reloads) == 2
    assert "reload_failed" in events(sink)
    assert events(sink).count("reloaded") == 2


def test_a_component_failing_while_serving_stops_the_run() -> None:
    log, _ = capturing_logger()
    lifecycle = Lifecycle(log, lambda state: True)
    journal = Journal()

    def start() -> None:
        journal.entries.append("start milter")
        threading.Timer(0.05, lifecycle.stop_soon, ["libmilter stopped"]).start()

    stopped = lifecycle.run([journal.step("store"), Step("milter", start, lambda: None)])
    assert stopped.reason == "libmilter stopped"
    assert not stopped.clean
    assert journal.entries == ["start store", "start milter", "stop store"]


def test_a_notify_failure_is_logged_not_fatal() -> None:
    log, sink = capturing_logger()

    def broken(state: str) -> bool:
        if state == "READY=1":
            os.kill(os.getpid(), signal.SIGTERM)
        raise NotifyError("cannot notify @x: Connection refused")

    assert Lifecycle(log, broken).run([Journal().step("store")]).clean
    assert events(sink).count("notify_failed") == 2


def test_a_stop_wins_over_a_reload_that_hangs() -> None:
    """SIGTERM during a reload: the reload is cancelled and the components stop."""
    log, sink = capturing_logger()
    lifecycle = Lifecycle(log, lambda state: True)
    journal = Journal()
    hanging = threading.Event()
    cancelled = threading.Event()

    def relearn() -> None:
        hanging.set()
        os.kill(os.getpid(), signal.SIGTERM)
        cancelled.wait()  # as a postconf that never answers, until killed

    lifecycle.on_reload("local delivery", relearn, cancelled.set)

    def start() -> None:
        os.kill(os.getpid(), signal.SIGHUP)

    stopped = lifecycle.run([journal.step("store"), Step("probe", start, lambda: None)])
    assert stopped.reason == "SIGTERM" and stopped.clean
    assert hanging.is_set() and cancelled.is_set()
    assert journal.entries == ["start store", "stop store"]
    assert "reloaded" not in events(sink)
    assert "reload_abandoned" not in events(sink)


def test_a_reload_that_ignores_its_cancel_is_left_behind() -> None:
    log, sink = capturing_logger()
    lifecycle = Lifecycle(log, lambda state: True)
    journal = Journal()
    release = threading.Event()

    def relearn() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        release.wait()

    lifecycle.on_reload("stubborn", relearn)
    try:
        stopped = lifecycle.run(
            [
                journal.step("store"),
                Step("probe", lambda: os.kill(os.getpid(), signal.SIGHUP), lambda: None),
            ]
        )
    finally:
        release.set()
    assert stopped.reason == "SIGTERM"
    # The store was stopped (the snapshot saved) all the same.
    assert journal.entries == ["start store", "stop store"]
    assert "reload_abandoned" in events(sink)
