"""A UNIX stream socket served by asyncio in a thread of its own.

Every door that listens on a UNIX socket beside libmilter (the ingest
endpoint, the socketmap endpoint, the policy door) shares this lifecycle:
libmilter owns the main thread and the signals, so each door runs its own
event loop in a daemon thread and is stopped explicitly after the milter
returns. The doors the MTA asks (socketmap, policy) share more:
:class:`MtaDoor`.

The base class binds the socket at ``start()`` (so that errors surface at
start, never in the thread), sets its mode and group, counts clients against
a cap, and serves each connection with :class:`FramedConnection`: requests
framed by the door, answered in order, one at a time, with a timeout while
idle and one per request, and store calls off the loop when they may block.
A door says how requests are framed (:meth:`split_request`) and answered
(:meth:`answer_request`), and what each kind of refusal sounds like. A door
may also answer several pipelined requests in one step
(:meth:`joins_batch`, :meth:`answer_batch`): those that a client sent
before reading any reply, and that have arrived, are taken together, still
one reply each and in order.

Connections are plain asyncio Protocols: streams (a reader, a writer and a
coroutine per read) cost more than the small requests themselves.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import functools
import os
import platform
import socket
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog

from popauth.basics.errors import InputError
from popauth.basics.posixids import SystemGroup
from popauth.doors.sockets import (
    clear_stale_socket,
    prepare_directory,
    remove_socket,
    set_permissions,
)

_PEERCRED = struct.Struct("3i")
# Python does not name SO_PEERGROUPS (Linux 4.13); this is its number on every
# architecture that uses the generic socket options, the ones Debian builds
# popauth for except those listed.
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", None) or {
    "sparc": 0x003D,
    "sparc64": 0x003D,
    "parisc": 0x4034,
    "parisc64": 0x4034,
}.get(platform.machine(), 59)
_GID = struct.Struct("I")
# As many supplementary groups as Python's getsockopt has room for (1024 bytes).
_MAX_GROUPS = 256
LISTEN_BACKLOG = 4096


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int
    # The supplementary groups the process held when it connected.
    groups: frozenset[int] = frozenset()

    def in_group(self, gids: frozenset[int]) -> bool:
        """Whether the primary or a supplementary group is one of ``gids``."""
        return self.gid in gids or not gids.isdisjoint(self.groups)


def peer_of(connection: socket.socket) -> Peer:
    """The process at the other end of a UNIX socket (SO_PEERCRED, SO_PEERGROUPS).

    Both are the kernel's record of the peer's credentials at connect time:
    a client cannot forge them, and no user database is asked. A user who
    was just added to a group has it once they start a new session, as for
    file permissions.
    """
    raw = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return Peer(pid, uid, gid, _peer_groups(connection))


def _peer_groups(connection: socket.socket) -> frozenset[int]:
    """The peer's supplementary groups, or none where the kernel cannot say
    or they do not fit (then only the primary group counts: fail closed)."""
    try:
        raw = connection.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, _MAX_GROUPS * _GID.size)
    except OSError:
        return frozenset()
    return frozenset(gid for (gid,) in _GID.iter_unpack(raw[: len(raw) - len(raw) % _GID.size]))


class FramingError(InputError):
    """The client broke the framing: answer ``reply`` and close the connection."""

    def __init__(self, reply: bytes, reason: str) -> None:
        super().__init__(reason)
        self.reply = reply


@dataclass(frozen=True, slots=True)
class Refusals:
    """What a door answers when it will not serve a request normally."""

    # A request started but not completed within the request timeout.
    timeout: bytes
    # No request within the idle timeout; None: close without a word.
    idle: bytes | None
    # More clients than allowed.
    busy: bytes
    # Whether the busy reply waits for the first request (socketmap has no
    # greeting: an unasked reply would be taken for the answer to a lookup).
    busy_answers_a_request: bool
    # A request whose answer failed unexpectedly (nothing was changed).
    internal: bytes


class SocketOptions(Protocol):
    """What every door on a UNIX socket reads from its settings group."""

    @property
    def socket_mode(self) -> int: ...
    @property
    def socket_group(self) -> SystemGroup | None: ...
    # Seconds to complete a request once its first byte arrived.
    @property
    def timeout(self) -> float: ...
    @property
    def max_clients(self) -> int: ...
    # Connections one uid may hold unless the door counts it privileged
    # (root, popauth's user, and whom the door names); 0: no quota.
    @property
    def clients_per_uid(self) -> int: ...


class MtaSocketOptions(SocketOptions, Protocol):
    """A door the MTA keeps persistent connections to (socketmap, policy)."""

    # Seconds a persistent connection may stay idle between requests.
    @property
    def idle_timeout(self) -> float: ...


class UnixStreamServer(abc.ABC):
    """Serve ``path`` with asyncio in a thread; subclasses speak the protocol."""

    def __init__(
        self,
        *,
        path: Path,
        settings: SocketOptions,
        idle_timeout: float,
        refusals: Refusals,
        blocking_calls: bool,
        thread_name: str,
        log: structlog.typing.FilteringBoundLogger,
        first_byte_timeout: float | None = None,
        acl_groups: tuple[SystemGroup, ...] = (),
    ) -> None:
        """The socket's mode, group, client cap and per-uid quota and the
        request timeout are ``settings``'."""
        self._path = path
        self._mode = settings.socket_mode
        self._group = settings.socket_group
        self._acl_groups = acl_groups
        self._max_clients = settings.max_clients
        self.request_timeout = settings.timeout
        self.idle_timeout = idle_timeout
        self.refusals = refusals
        self._blocking_calls = blocking_calls
        self._thread_name = thread_name
        self._log = log
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        # Every open connection, and those admitted (not refused as busy).
        self._connections: set[FramedConnection] = set()
        self._admitted: set[FramedConnection] = set()
        # Connections per unprivileged uid, bounded by max_clients_per_uid.
        self._max_clients_per_uid = settings.clients_per_uid or None
        self._per_uid: collections.Counter[int] = collections.Counter()
        # A client that connects and says nothing is dropped this soon.
        self.first_byte_timeout = idle_timeout if first_byte_timeout is None else first_byte_timeout

    @property
    def path(self) -> Path:
        return self._path

    @property
    def log(self) -> structlog.typing.FilteringBoundLogger:
        return self._log

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop that serves every connection, in the door's thread."""
        return self._loop

    @property
    def blocking_calls(self) -> bool:
        """Whether store calls must run off the event loop."""
        return self._blocking_calls

    @property
    def clients(self) -> int:
        """Connections open now (including one being refused as busy)."""
        return len(self._connections)

    # --- what a door implements -------------------------------------------

    @abc.abstractmethod
    def split_request(self, buffer: bytearray) -> tuple[bytes, int] | None:
        """The next request in ``buffer`` and how many bytes it took, or None
        if it is incomplete; FramingError if it can never be completed."""

    @abc.abstractmethod
    def answer_request(self, request: bytes, peer: Peer) -> tuple[bytes, bool]:
        """The reply to one request, and whether to keep the connection open.

        Runs in a worker thread when the store may block.
        """

    def joins_batch(self, request: bytes) -> bool:
        """Whether ``request`` may be answered together with the requests of
        the same kind that follow it (see :meth:`answer_batch`)."""
        return False

    def answer_batch(self, requests: list[bytes], peer: Peer) -> list[tuple[bytes, bool]]:
        """The replies to consecutive requests that :meth:`joins_batch`
        admitted (at most :attr:`max_batch`), one each, in order.

        Runs in a worker thread when the store may block.
        """
        return [self.answer_request(request, peer) for request in requests]

    @property
    def max_batch(self) -> int:
        """The most requests :meth:`answer_batch` is given at once."""
        return 1

    def note(self, event: str, peer: Peer) -> None:
        """A refusal happened (busy, timeout, partial, framing): log or count it."""
        self._log.warning(event, peer_uid=peer.uid)

    def answers_off_loop(self, request: bytes) -> bool:
        """Whether ``request`` is answered in a worker thread, off the event loop.

        By default when the store may block; a door adds the requests whose
        answer takes long however fast the store (a walk over all of it).
        """
        return self._blocking_calls

    def privileged(self, peer: Peer) -> bool:
        """Whether ``peer`` is exempt from ``max_clients_per_uid``."""
        return peer.uid in (0, os.getuid())

    def answer_safely(self, request: bytes, peer: Peer) -> tuple[bytes, bool]:
        """:meth:`answer_request`, with any unexpected failure turned into the
        door's internal-error reply (and logged with its traceback): every
        request gets exactly one reply and the door keeps serving."""
        try:
            return self.answer_request(request, peer)
        except Exception:
            self._log.exception("request_failed", peer_uid=peer.uid)
            return self.refusals.internal, True

    def answer_batch_safely(self, requests: list[bytes], peer: Peer) -> list[tuple[bytes, bool]]:
        """:meth:`answer_batch` (:meth:`answer_safely` for one request), with
        every request of a batch that fails unexpectedly, or that answers a
        different number of replies, given the internal-error reply."""
        if len(requests) == 1:
            return [self.answer_safely(requests[0], peer)]
        try:
            replies = self.answer_batch(requests, peer)
            if len(replies) != len(requests):
                raise RuntimeError(f"{len(replies)} replies to {len(requests)} requests")
        except Exception:
            self._log.exception("request_failed", peer_uid=peer.uid, requests=len(requests))
            return [(self.refusals.internal, True)] * len(requests)
        return replies

    # --- lifecycle -------------------------------------------------------

    def start(self) -> None:
        """Bind the socket now, so that errors surface at start, then serve."""
        prepare_directory(self._path)
        clear_stale_socket(self._path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self._path))
            set_permissions(self._path, self._mode, self._group, self._acl_groups)
            # Bursts of connects must wait in the backlog, not fail with
            # EAGAIN (the kernel caps this at net.core.somaxconn).
            listener.listen(LISTEN_BACKLOG)
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
            # asyncio calls listen() again with this backlog (100 if not given).
            self._server = await self._loop.create_unix_server(
                lambda: FramedConnection(self), sock=listener, backlog=LISTEN_BACKLOG
            )
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
                # on their own: end them.
                for connection in list(self._connections):
                    connection.close()
                # A transport closes its socket on the loop's next turns
                # (connection_lost): wait for that, not just for the listener.
                try:
                    async with asyncio.timeout(timeout):
                        while self._connections:
                            await asyncio.sleep(0.01)
                        await self._server.wait_closed()
                except TimeoutError:
                    pass
            self._loop.stop()

        asyncio.run_coroutine_threadsafe(shut(), self._loop)
        self._thread.join(timeout + 1.0)
        self._thread = None
        remove_socket(self._path)

    # --- bookkeeping for FramedConnection ----------------------------------

    def opened(self, connection: FramedConnection) -> bool:
        """Count a new connection; False if it must be refused as busy.

        An unprivileged uid may hold at most ``max_clients_per_uid``
        connections, so that one local user cannot take every slot. When
        all ``max_clients`` slots are taken, the connection that has been
        idle longest (no request under way) is closed to make room: idle
        clients cannot lock out one that has something to ask. Only when
        every slot is in the middle of a request is the newcomer refused.
        """
        self._connections.add(connection)
        peer = connection.peer
        if self._max_clients_per_uid is not None and not self.privileged(peer):
            if self._per_uid[peer.uid] >= self._max_clients_per_uid:
                return False
            self._per_uid[peer.uid] += 1
            connection.quota_uid = peer.uid
        if len(self._admitted) >= self._max_clients and not self._evict_idlest():
            self._release_quota(connection)
            return False
        self._admitted.add(connection)
        return True

    def _evict_idlest(self) -> bool:
        idle = [c for c in self._admitted if c.is_idle()]
        if not idle:
            return False
        idlest = min(idle, key=lambda c: c.last_active)
        self._admitted.discard(idlest)
        self._release_quota(idlest)
        idlest.evict()
        return True

    def _release_quota(self, connection: FramedConnection) -> None:
        if connection.quota_uid is not None:
            self._per_uid[connection.quota_uid] -= 1
            if not self._per_uid[connection.quota_uid]:
                del self._per_uid[connection.quota_uid]
            connection.quota_uid = None

    def closed(self, connection: FramedConnection) -> None:
        self._connections.discard(connection)
        if connection in self._admitted:
            self._admitted.discard(connection)
            self._release_quota(connection)


class MtaDoor(UnixStreamServer):
    """A door the MTA asks over persistent connections (socketmap, policy).

    An idle connection is closed without a word; a client refused as busy
    gets its refusal as the answer to its first request (the MTA asks
    first); the MTA itself (the socket's group, else popauth's own) is never
    held to the per-uid quota.
    """

    def __init__(
        self,
        *,
        path: Path,
        settings: MtaSocketOptions,
        timeout_reply: bytes,
        busy_reply: bytes,
        internal_reply: bytes,
        blocking_calls: bool,
        thread_name: str,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        super().__init__(
            path=path,
            settings=settings,
            idle_timeout=settings.idle_timeout,
            refusals=Refusals(
                timeout=timeout_reply,
                idle=None,
                busy=busy_reply,
                busy_answers_a_request=True,
                internal=internal_reply,
            ),
            blocking_calls=blocking_calls,
            thread_name=thread_name,
            log=log,
        )
        group = settings.socket_group
        self._mta_gid = group.gid if group is not None else os.getgid()

    def privileged(self, peer: Peer) -> bool:
        return peer.gid == self._mta_gid or super().privileged(peer)

    def stop(self, timeout: float = 5.0) -> None:
        running = self._thread is not None
        super().stop(timeout)
        if running:
            self.stopped()

    @abc.abstractmethod
    def stopped(self) -> None:
        """The door has stopped serving, once per start: say so in the log."""


class FramedConnection(asyncio.Protocol):
    """One client: requests in, replies out, in order, one request at a time.

    While no request is under way the idle timeout runs; from the first byte
    of a request, the request timeout. One timer per connection, moved
    lazily: a busy client does not pay for a new timer with every request.
    """

    def __init__(self, door: UnixStreamServer) -> None:
        self._door = door
        # The door's loop, which runs every callback here. Kept rather than
        # asked for: asyncio.get_running_loop() makes a getpid() system call
        # each time, three per request.
        self._loop = door.loop
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._peer = Peer(0, -1, -1)
        # The unprivileged uid this connection counts against, if any.
        self.quota_uid: int | None = None
        self.last_active = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._idle = True
        self._busy = False
        # A request waiting on a store that may block; later ones wait too.
        self._in_flight = False

    # --- asyncio callbacks ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._peer = peer_of(transport.get_extra_info("socket"))
        self.last_active = self._loop.time()
        if not self._door.opened(self):
            self._busy = True
            self._door.note("busy", self._peer)
            if not self._door.refusals.busy_answers_a_request:
                self._finish(self._door.refusals.busy)
                return
        # A refused client waiting to ask its first question (socketmap) gets
        # no more time than a request may take: it only holds a descriptor.
        limit = self._door.request_timeout if self._busy else self._door.first_byte_timeout
        self._wait(idle=True, limit=limit)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._door.closed(self)

    def data_received(self, data: bytes) -> None:
        self.last_active = self._loop.time()
        self._buffer += data
        self._serve()

    def eof_received(self) -> bool:
        if self._buffer:
            # The client hung up mid-request: half a request is never applied.
            self._door.note("partial_request", self._peer)
            self._buffer.clear()
        return False  # close our side too

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    @property
    def peer(self) -> Peer:
        return self._peer

    def is_idle(self) -> bool:
        """Open, between requests, with nothing read and nothing being answered."""
        return (
            self._idle
            and not self._buffer
            and not self._in_flight
            and not self._busy
            and self._open()
        )

    def evict(self) -> None:
        """Close an idle connection to make room (as if it had timed out)."""
        self._door.note("evicted", self._peer)
        self._finish(self._door.refusals.idle)

    # --- serving ---------------------------------------------------------

    def _open(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def _serve(self) -> None:
        while not self._in_flight and self._open():
            try:
                framed = self._door.split_request(self._buffer)
            except FramingError as problem:
                self._door.note("framing_error", self._peer)
                self._finish(problem.reply)
                return
            except Exception:
                # The stream's framing is unknown now: one reply, then close.
                self._door.log.exception("request_failed", peer_uid=self._peer.uid)
                self._finish(self._door.refusals.internal)
                return
            if framed is None:
                if self._buffer and self._idle:
                    self._wait(idle=False)  # a request has begun
                return
            request, length = framed
            del self._buffer[:length]
            batch = self._take_batch(request)
            self._wait(idle=not self._buffer)
            if self._busy:
                self._finish(self._door.refusals.busy)
                return
            if self._door.answers_off_loop(request):
                # A slow answer must not hold up every other client of the loop.
                self._in_flight = True
                assert self._transport is not None
                self._transport.pause_reading()
                done = self._loop.run_in_executor(
                    None, self._door.answer_batch_safely, batch, self._peer
                )
                done.add_done_callback(functools.partial(self._answered, len(batch)))
                return
            self._reply_all(self._door.answer_batch_safely(batch, self._peer))

    def _take_batch(self, first: bytes) -> list[bytes]:
        """``first`` and the complete requests after it that may join it.

        Only what has already arrived is taken: a batch never waits for more.
        A request that cannot be framed stays in the buffer, to be refused
        after the batch has been answered.
        """
        batch = [first]
        door = self._door
        if not door.joins_batch(first):
            return batch
        while len(batch) < door.max_batch and self._buffer:
            try:
                framed = door.split_request(self._buffer)
            except Exception:
                break
            if framed is None or not door.joins_batch(framed[0]):
                break
            batch.append(framed[0])
            del self._buffer[: framed[1]]
        return batch

    def _answered(self, count: int, done: asyncio.Future[list[tuple[bytes, bool]]]) -> None:
        self._in_flight = False
        if not self._open():
            return
        failure = done.exception()
        if failure is not None:
            # answer_batch_safely catches every Exception; this is the
            # executor itself failing (e.g. shut down under us).
            self._door.log.error("request_failed", error=repr(failure), exc_info=failure)
            self._reply_all([(self._door.refusals.internal, True)] * count)
        else:
            self._reply_all(done.result())
        if not self._open():
            return
        assert self._transport is not None
        self._transport.resume_reading()
        self._serve()

    def _reply_all(self, replies: list[tuple[bytes, bool]]) -> None:
        """Write the replies of a batch in one piece; close after one that says so."""
        assert self._transport is not None
        self.last_active = self._loop.time()
        for end, (_, keep_open) in enumerate(replies, 1):
            if not keep_open:
                self._transport.write(b"".join(reply for reply, _ in replies[:end]))
                self._transport.close()
                return
        self._transport.write(b"".join(reply for reply, _ in replies))

    def _finish(self, reply: bytes | None) -> None:
        """Send a last reply (if any) and close."""
        self._buffer.clear()
        if self._open():
            assert self._transport is not None
            if reply:
                self._transport.write(reply)
            self._transport.close()

    # --- timeouts ----------------------------------------------------------

    def _wait(self, *, idle: bool, limit: float | None = None) -> None:
        loop = self._loop
        self._idle = idle
        if limit is None:
            limit = self._door.idle_timeout if idle else self._door.request_timeout
        self._deadline = loop.time() + limit
        # A later deadline is picked up when the timer fires; an earlier one
        # (idle -> request) needs the timer moved now.
        if self._timer is None or self._deadline < self._timer.when():
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(self._deadline, self._check_clock)

    def _check_clock(self) -> None:
        loop = self._loop
        if loop.time() < self._deadline:
            self._timer = loop.call_at(self._deadline, self._check_clock)
            return
        self._timer = None
        if self._in_flight:
            self._wait(idle=False)  # the store is answering; it has its own timeout
            return
        self._door.note("idle_timeout" if self._idle else "timeout", self._peer)
        self._finish(self._door.refusals.idle if self._idle else self._door.refusals.timeout)
