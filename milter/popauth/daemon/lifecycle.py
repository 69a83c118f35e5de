"""One lifecycle for every component: start in order, stop in reverse, once.

``serve`` lists its components (store, saver, ingest, socketmap, metrics,
milter) as :class:`Step` values; :meth:`Lifecycle.run` starts them one after
the other, tells systemd ``READY=1`` once all of them listen, and waits.
Whatever ends the run (SIGTERM, SIGINT, a component that fails while
serving, or a component that fails to start) leaves through the same
path: the components started so far are stopped in reverse order, each
stop attempted even when an earlier one failed.

Signals. libmilter runs a thread of its own that waits for SIGTERM, SIGINT
and SIGHUP and stops the milter on any of them, noticed only at its next
5-second poll. popauth keeps these signals for itself: before anything
starts, the main thread installs handlers for them (which only write the
signal's number to a wake-up socket) and never blocks them. Linux delivers
a process-directed signal to the main thread whenever that thread accepts
it, so libmilter's thread, which blocks them except while it waits, never
sees them. A signal that arrives during the start waits in the socket and
is acted on once the start is over: SIGTERM and SIGINT stop everything at
once, and SIGHUP runs the reload callbacks and leaves the milter serving.
Reloads run in a worker thread, one at a time (SIGHUPs that arrive during a
reload make one more), so the main thread always hears a stop: a reload
can wait on an MTA tool that hangs (a ``postconf``, a ``postmap`` on an
unreachable LDAP table). A stop wins: the reloads' cancel callbacks kill
what they run, the worker is given RELOAD_GRACE seconds and then abandoned
(it is a daemon thread), and the components stop as always, the snapshot
last.

One window remains: a signal that arrives while the main thread is inside
the handler of the same signal (a burst within microseconds), or while
another signal is still pending for it, can reach libmilter's thread. A
SIGTERM that does stops the milter; the lifecycle notices (the milter
reports its exit) and stops the rest.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import FrameType

import structlog

from popauth.daemon.notify import NotifyError, notify

CAUGHT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})
# The byte stop_soon() writes to the wake-up socket; no signal has number 0.
_STOP_REQUESTED = 0
# How long a stop waits for a cancelled reload before leaving it behind.
RELOAD_GRACE = 1.0


@dataclass(frozen=True)
class Step:
    """One component as the lifecycle sees it: a name, a start and a stop."""

    name: str
    start: Callable[[], None]
    stop: Callable[[], None]


@dataclass(frozen=True)
class Stopped:
    """Why a run ended; ``clean`` is False when a component failed while serving."""

    reason: str
    clean: bool


def _caught(signum: int, frame: FrameType | None) -> None:
    """Nothing to do here: the wake-up socket carries the signal number."""


class Lifecycle:
    def __init__(
        self,
        log: structlog.typing.FilteringBoundLogger,
        notify_systemd: Callable[[str], bool] = notify,
    ) -> None:
        self._log = log
        self._notify = notify_systemd
        self._reloads: list[Reload] = []
        self._lock = threading.Lock()
        self._failure: str | None = None
        self._wake: socket.socket | None = None

    def on_reload(
        self, name: str, callback: Callable[[], None], cancel: Callable[[], None] | None = None
    ) -> None:
        """Run ``callback`` on SIGHUP (in registration order, in the reload
        thread); a failure is logged. ``cancel`` is called (from the main
        thread) when popauth stops: it must make a running callback return soon."""
        self._reloads.append(Reload(name, callback, cancel))

    def stop_soon(self, reason: str) -> None:
        """Stop everything because a component failed while serving (any thread)."""
        with self._lock:
            if self._failure is None:
                self._failure = reason
            wake = self._wake
        if wake is not None:
            with contextlib.suppress(OSError):
                wake.send(bytes([_STOP_REQUESTED]))

    def run(self, steps: Sequence[Step]) -> Stopped:
        """Start ``steps``, serve until told to stop, then stop what started.

        Must be called from the main thread. A start failure is raised after
        the steps that did start have been stopped.
        """
        with self._signals_held() as woken, contextlib.ExitStack() as started:
            for step in steps:
                self._start(step)
                started.callback(self._stop, step)
            reloader = ReloadWorker(self._reloads, self._log)
            self._tell("READY=1")
            self._log.info("ready", components=[step.name for step in steps])
            stopped = self._serve_until_stopped(woken, reloader)
            self._tell("STOPPING=1")
            self._log.info("stopping", reason=stopped.reason)
            reloader.stop()
        self._log.info("stopped", reason=stopped.reason)
        return stopped

    @contextlib.contextmanager
    def _signals_held(self) -> Iterator[socket.socket]:
        """Route the caught signals to a wake-up socket, unblocked in this thread."""
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        previous_mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, CAUGHT_SIGNALS)
        previous_handlers = {number: signal.signal(number, _caught) for number in CAUGHT_SIGNALS}
        previous_wakeup = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        with self._lock:
            self._wake = writer
        try:
            yield reader
        finally:
            with self._lock:
                self._wake = None
            signal.set_wakeup_fd(previous_wakeup)
            for number, handler in previous_handlers.items():
                signal.signal(number, handler)
            signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
            reader.close()
            writer.close()

    def _serve_until_stopped(self, woken: socket.socket, reloader: ReloadWorker) -> Stopped:
        while True:
            for number in woken.recv(64):
                if number == _STOP_REQUESTED:
                    with self._lock:
                        reason = self._failure or "stop requested"
                    return Stopped(reason, clean=False)
                if number in STOP_SIGNALS:
                    return Stopped(signal.Signals(number).name, clean=True)
                if number == signal.SIGHUP:
                    reloader.request()

    def _start(self, step: Step) -> None:
        try:
            step.start()
        except Exception as error:
            self._log.error("start_failed", component=step.name, error=str(error))
            raise
        self._log.debug("started", component=step.name)

    def _stop(self, step: Step) -> None:
        try:
            step.stop()
        except Exception:
            self._log.exception("stop_failed", component=step.name)
        else:
            self._log.debug("component_stopped", component=step.name)

    def _tell(self, state: str) -> None:
        try:
            self._notify(state)
        except NotifyError as error:
            self._log.warning("notify_failed", state=state, error=str(error))


@dataclass(frozen=True)
class Reload:
    name: str
    callback: Callable[[], None]
    cancel: Callable[[], None] | None = None


class ReloadWorker:
    """Runs the reload callbacks in a thread of their own, never two at once."""

    def __init__(self, reloads: Sequence[Reload], log: structlog.typing.FilteringBoundLogger):
        self._reloads = tuple(reloads)
        self._log = log
        self._wanted = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="popauth-reload", daemon=True)
        self._thread.start()

    def request(self) -> None:
        """One more reload after the one running, if any (requests coalesce)."""
        self._wanted.set()

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            if self._stopping.is_set():
                return
            self._wanted.clear()
            for reload in self._reloads:
                if self._stopping.is_set():
                    return
                try:
                    reload.callback()
                except Exception:
                    self._log.exception("reload_failed", component=reload.name)
            if not self._stopping.is_set():
                self._log.info("reloaded", components=[reload.name for reload in self._reloads])

    def stop(self, grace: float = RELOAD_GRACE) -> None:
        """Cancel what runs, wait ``grace`` seconds for it, then leave it behind."""
        self._stopping.set()
        self._wanted.set()
        for reload in self._reloads:
            if reload.cancel is None:
                continue
            try:
                reload.cancel()
            except Exception:
                self._log.exception("reload_cancel_failed", component=reload.name)
        self._thread.join(grace)
        if self._thread.is_alive():
            self._log.warning("reload_abandoned", grace=grace)
