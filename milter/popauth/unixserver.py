"""A UNIX stream socket served by asyncio in a thread of its own.

Every door that listens on a UNIX socket beside libmilter (the ingest
endpoint, the socketmap endpoint) shares this lifecycle: libmilter owns the
main thread and the signals, so each door runs its own event loop in a
daemon thread and is stopped explicitly after the milter returns.

The base class binds the socket at ``start()`` (so that errors surface at
start, never in the thread), sets its mode and group, counts clients
against a cap, closes every connection however it ends, and runs blocking
store calls off the loop. A door either implements :meth:`serve_connection`
(one client over streams, for as long as it stays) and :meth:`refuse_busy`
(what a client over the cap is told), or :meth:`protocol_factory`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import structlog

from popauth.sockets import clear_stale_socket, prepare_directory, remove_socket, set_permissions

_Result = TypeVar("_Result")


class UnixStreamServer:
    """Serve ``path`` with asyncio in a thread; subclasses speak the protocol."""

    def __init__(
        self,
        *,
        path: Path,
        mode: int,
        group: str,
        max_clients: int,
        stream_limit: int,
        blocking_calls: bool,
        thread_name: str,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self._path = path
        self._mode = mode
        self._group = group
        self._max_clients = max_clients
        self._stream_limit = stream_limit
        self._blocking_calls = blocking_calls
        self._thread_name = thread_name
        self._log = log
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._clients = 0
        # Connections being served, so that stop() can end persistent ones.
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def path(self) -> Path:
        return self._path

    @property
    def blocking_calls(self) -> bool:
        """Whether store calls must run off the event loop."""
        return self._blocking_calls

    @property
    def clients(self) -> int:
        """Connections open now (including one being refused as busy)."""
        return self._clients

    # --- lifecycle -------------------------------------------------------

    def start(self) -> None:
        """Bind the socket now, so that errors surface at start, then serve."""
        prepare_directory(self._path)
        clear_stale_socket(self._path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self._path))
            set_permissions(self._path, self._mode, self._group)
            listener.listen(128)
        except Exception:
            listener.close()
            remove_socket(self._path)
            raise
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(listener, ready), name=self._thread_name, daemon=True
        )
        self._thread.start()
        ready.wait()

    def _run(self, listener: socket.socket, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)

        async def serve() -> None:
            factory = self.protocol_factory()
            if factory is None:
                self._server = await asyncio.start_unix_server(
                    self._client_connected, sock=listener, limit=self._stream_limit
                )
            else:
                self._server = await self._loop.create_unix_server(factory, sock=listener)
            ready.set()

        self._loop.run_until_complete(serve())
        self._loop.run_forever()
        self._loop.close()

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is None:
            return

        async def shut() -> None:
            if self._server is not None:
                self._server.close()
                # Persistent clients (an MTA's lookup connections) never leave
                # on their own: end them, so that none is destroyed pending.
                self.close_connections()
                for task in self._tasks:
                    task.cancel()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        asyncio.gather(*self._tasks, return_exceptions=True), timeout
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._server.wait_closed(), timeout)
            self._loop.stop()

        asyncio.run_coroutine_threadsafe(shut(), self._loop)
        self._thread.join(timeout + 1.0)
        self._thread = None
        remove_socket(self._path)

    # --- one client ------------------------------------------------------

    async def _client_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._clients += 1
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            if self._clients > self._max_clients:
                await self.refuse_busy(reader, writer)
            else:
                await self.serve_connection(reader, writer)
        except (ConnectionError, BrokenPipeError):
            pass  # the client reset the connection; a door may log it itself
        finally:
            self._clients -= 1
            if task is not None:
                self._tasks.discard(task)
            with contextlib.suppress(ConnectionError, OSError):
                await writer.drain()
                writer.close()

    def protocol_factory(self) -> Callable[[], asyncio.Protocol] | None:
        """A door that frames requests itself serves a Protocol per connection.

        Protocols skip the stream machinery (a reader, a writer, a coroutine
        per read), which is most of the cost of a small request. Such a door
        counts its connections with :meth:`connection_opened` and
        :meth:`connection_closed`, and ends them in :meth:`close_connections`.
        """
        return None

    def connection_opened(self) -> bool:
        """Count a new connection; False if it is over ``max_clients``."""
        self._clients += 1
        return self._clients <= self._max_clients

    def connection_closed(self) -> None:
        self._clients -= 1

    def close_connections(self) -> None:
        """End the connections of a Protocol door at stop (streams: nothing to do)."""

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Serve one client until it leaves or must be dropped (stream doors)."""
        raise NotImplementedError

    async def refuse_busy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Tell a client over ``max_clients`` to come back later (stream doors)."""
        raise NotImplementedError

    async def call(self, function: Callable[..., _Result], *arguments: object) -> _Result:
        """Run ``function`` (which may call the store) without holding up the loop.

        A store whose calls may wait on the network runs in a worker thread,
        so that one slow answer does not hold up every other client.
        """
        if self._blocking_calls:
            return await asyncio.to_thread(function, *arguments)
        return function(*arguments)
