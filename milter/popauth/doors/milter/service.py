"""libmilter's listener as a component: listen at start, serve in a thread,
stop at once.

libmilter checks its stop flag only when its listener wakes up: at a new
connection, or every 5 seconds. :meth:`MilterService.stop` sets the flag
(``smfi_stop``) and connects to the milter socket, so the listener wakes,
sees the flag and returns within milliseconds.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import structlog

from popauth.basics.errors import StartupError
from popauth.basics.posixids import SystemGroup
from popauth.doors.milter.adapter import MilterFactory, register_milter
from popauth.doors.sockets import (
    clear_stale_socket,
    prepare_directory,
    remove_socket,
    set_permissions,
)


def socket_path(spec: str) -> Path | None:
    """The filesystem path of a ``unix:``/``local:`` milter socket spec."""
    kind, _, rest = spec.partition(":")
    return Path(rest) if kind in ("unix", "local") else None


def wake_listener(spec: str, timeout: float = 1.0) -> bool:
    """Connect once to the milter socket ``spec``; False if nothing answered."""
    path = socket_path(spec)
    targets: list[tuple[int, str | tuple[Any, ...]]]
    if path is not None:
        targets = [(socket.AF_UNIX, str(path))]
    else:
        kind, _, rest = spec.partition(":")
        port, _, host = rest.partition("@")
        # No host: libmilter listens on every address; loopback is one of them.
        host = host.strip("[]") or ("::1" if kind == "inet6" else "127.0.0.1")
        family = socket.AF_INET6 if kind == "inet6" else socket.AF_INET
        try:
            found = socket.getaddrinfo(host, int(port), family, socket.SOCK_STREAM)
        except OSError:
            return False
        targets = [(entry[0], entry[4]) for entry in found]
    for target_family, address in targets:
        with socket.socket(target_family, socket.SOCK_STREAM) as poke:
            poke.settimeout(timeout)
            try:
                poke.connect(address)
            except OSError:
                continue
            return True
    return False


# A milter protocol packet: length 1, command 'Q' (quit).
_QUIT = b"\x00\x00\x00\x01Q"


def quit_answered(spec: str, timeout: float) -> bool:
    """Whether a milter on ``spec`` (a unix: socket) accepts a session and ends it at QUIT."""
    path = socket_path(spec)
    if path is None:
        return wake_listener(spec, timeout)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as session:
        session.settimeout(max(timeout, 0.01))
        try:
            session.connect(str(path))
            session.sendall(_QUIT)
            return session.recv(64) == b""
        except OSError:
            return False


class MilterSocketError(StartupError, OSError):
    """libmilter could not open the milter socket."""


class MilterOptions(Protocol):
    """What the milter door reads from its settings group (``settings.milter``)."""

    @property
    def socket(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def timeout(self) -> int: ...
    @property
    def socket_mode(self) -> int: ...
    @property
    def socket_group(self) -> SystemGroup | None: ...


class MilterService:
    """The milter socket: opened at :meth:`start`, served by libmilter's main()
    in a thread, closed by :meth:`stop`.

    ``on_exit`` is called if libmilter stops by itself (not through
    :meth:`stop`), so that the rest of popauth does not go on without it.
    """

    def __init__(
        self,
        *,
        settings: MilterOptions,
        factory: MilterFactory,
        on_exit: Callable[[str], None],
        log: structlog.typing.FilteringBoundLogger,
        stop_timeout: float = 10.0,
    ) -> None:
        self._name = settings.name
        self._spec = settings.socket
        self._timeout = settings.timeout
        self._mode = settings.socket_mode
        self._group = settings.socket_group
        self._factory = factory
        self._on_exit = on_exit
        self._log = log
        self._stop_timeout = stop_timeout
        self._path = socket_path(self._spec)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        import milter as libmilter  # pymilter's C module

        if self._path is not None:
            prepare_directory(self._path)
            clear_stale_socket(self._path)
        register_milter(
            name=self._name, spec=self._spec, timeout=self._timeout, factory=self._factory
        )
        try:
            libmilter.opensocket(True)
        except libmilter.error as error:
            raise MilterSocketError(f"cannot listen on {self._spec}: {error}") from None
        if self._path is not None:
            try:
                set_permissions(self._path, self._mode, self._group)
            except Exception:
                # Nothing may reach a socket popauth will never serve.
                remove_socket(self._path)
                raise
        self._thread = threading.Thread(target=self._serve, name="popauth-milter", daemon=True)
        self._thread.start()
        self._await_listener()

    def _await_listener(self) -> None:
        """Wait until libmilter's listener accepts connections.

        A connection queues before anything accepts it; a QUIT is answered
        by closing only once the listener has accepted the connection, and
        by then libmilter's own threads (its signal thread among them) are
        in place, so readiness is reported only when the milter truly serves.
        """
        assert self._thread is not None
        deadline = time.monotonic() + self._stop_timeout
        while self._thread.is_alive() and time.monotonic() < deadline:
            if quit_answered(self._spec, deadline - time.monotonic()):
                return
            self._thread.join(0.01)
        raise MilterSocketError(f"libmilter is not serving {self._spec}")

    def _serve(self) -> None:
        import milter as libmilter

        try:
            libmilter.main()
        except Exception as error:
            reason = f"libmilter failed: {error}"
        else:
            reason = "libmilter stopped"
        if not self._stopping.is_set():
            self._log.error("milter_stopped_unexpectedly", reason=reason)
            self._on_exit(reason)

    def stop(self) -> None:
        import milter as libmilter

        self._stopping.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            # smfi_stop() waits for a lock the listener holds while it sleeps
            # in select(): ask from a helper thread, and wake the listener
            # with a connection until it has seen the flag and returned.
            threading.Thread(target=libmilter.stop, name="popauth-milter-stop", daemon=True).start()
            deadline = time.monotonic() + self._stop_timeout
            while thread.is_alive() and time.monotonic() < deadline:
                wake_listener(self._spec)
                thread.join(0.02)
            if thread.is_alive():
                self._log.error("milter_stop_timeout", seconds=self._stop_timeout)
        if self._path is not None:
            with contextlib.suppress(OSError):
                remove_socket(self._path)
