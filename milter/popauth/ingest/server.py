"""The ingest endpoint: a UNIX stream socket served by asyncio in its own thread.

It runs beside libmilter, which owns the main thread and the signals, so it
has its own event loop and is stopped explicitly after the milter returns.
Each client gets a bounded line length, an idle timeout per request, and a
cap on concurrent clients; bad input gets an ``ERR`` reply and changes
nothing, and no client can stop the endpoint from serving the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import socket
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog

from popauth.addresses import WhitelistKeying
from popauth.ingest import protocol
from popauth.ingest.protocol import STATE_CHANGING, ErrorCode, ProtocolError, Request, Verb
from popauth.sockets import clear_stale_socket, prepare_directory, remove_socket, set_permissions
from popauth.store import StoreUnavailable, WhitelistStore

_PEERCRED = struct.Struct("3i")


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int


def peer_of(connection: socket.socket) -> Peer:
    raw = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return Peer(pid, uid, gid)


@dataclass(frozen=True, slots=True)
class PeerPolicy:
    """Which peers may change the whitelist (root and our own user always may)."""

    uids: frozenset[int]
    gids: frozenset[int]

    @classmethod
    def of(cls, users: Iterable[str], groups: Iterable[str]) -> PeerPolicy:
        from popauth.sockets import resolve_gid

        uids = {0, os.getuid()}
        uids.update(int(u) if u.isdigit() else pwd.getpwnam(u).pw_uid for u in users)
        return cls(frozenset(uids), frozenset(resolve_gid(g) for g in groups))

    def may_change(self, peer: Peer) -> bool:
        return peer.uid in self.uids or peer.gid in self.gids


@dataclass(frozen=True, slots=True)
class IngestLimits:
    timeout: float = 5.0
    max_clients: int = 256


class IngestServer:
    def __init__(
        self,
        *,
        path: Path,
        mode: int,
        group: str,
        store: WhitelistStore,
        keying: WhitelistKeying,
        peers: PeerPolicy,
        limits: IngestLimits,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self._path = path
        self._mode = mode
        self._group = group
        self._store = store
        self._keying = keying
        self._peers = peers
        self._limits = limits
        self._log = log.bind(door="ingest")
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._clients = 0

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
            target=self._run, args=(listener, ready), name="popauth-ingest", daemon=True
        )
        self._thread.start()
        ready.wait()

    def _run(self, listener: socket.socket, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)

        async def serve() -> None:
            self._server = await asyncio.start_unix_server(
                self._serve_client, sock=listener, limit=protocol.MAX_LINE
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
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._server.wait_closed(), timeout)
            self._loop.stop()

        asyncio.run_coroutine_threadsafe(shut(), self._loop)
        self._thread.join(timeout + 1.0)
        self._thread = None
        remove_socket(self._path)

    # --- one client ------------------------------------------------------

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        connection: socket.socket = writer.get_extra_info("socket")
        peer = peer_of(connection)
        self._clients += 1
        try:
            if self._clients > self._limits.max_clients:
                self._log.warning("ingest_busy", peer_uid=peer.uid, clients=self._clients)
                writer.write(protocol.error(ErrorCode.BUSY, "too many clients, try again"))
                return
            while await self._serve_request(reader, writer, peer):
                pass
        except (ConnectionError, BrokenPipeError):
            self._log.info("ingest_client_gone", peer_uid=peer.uid)
        finally:
            self._clients -= 1
            with contextlib.suppress(ConnectionError, OSError):
                await writer.drain()
                writer.close()

    async def _serve_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer
    ) -> bool:
        """Read and answer one request; False when the connection should end."""
        try:
            line = await asyncio.wait_for(reader.readuntil(b"\n"), self._limits.timeout)
        except TimeoutError:
            self._log.info("ingest_timeout", peer_uid=peer.uid)
            writer.write(protocol.error(ErrorCode.TIMEOUT, "no complete request in time"))
            return False
        except asyncio.IncompleteReadError as incomplete:
            if incomplete.partial:
                # The client hung up mid-line: a half request is never applied.
                self._log.warning("ingest_partial_request", peer_uid=peer.uid)
            return False
        except asyncio.LimitOverrunError:
            self._log.warning("ingest_rejected", peer_uid=peer.uid, error="too-long")
            writer.write(
                protocol.error(ErrorCode.TOO_LONG, f"request longer than {protocol.MAX_LINE} bytes")
            )
            return False
        if self._store.may_block:
            # A slow store must not hold up every other client of the loop.
            reply, keep_open = await asyncio.to_thread(self.answer, line, peer)
        else:
            reply, keep_open = self.answer(line, peer)
        writer.write(reply)
        await writer.drain()
        return keep_open

    def answer(self, line: bytes, peer: Peer) -> tuple[bytes, bool]:
        """The reply to one request line, and whether to keep the connection."""
        try:
            request = protocol.parse_request(line)
        except ProtocolError as problem:
            self._log.warning("ingest_rejected", peer_uid=peer.uid, error=problem.code.value)
            return protocol.error(problem.code, problem.reason), True
        if request.verb in STATE_CHANGING and not self._peers.may_change(peer):
            self._log.warning(
                "ingest_forbidden", verb=request.verb.value, peer_uid=peer.uid, peer_gid=peer.gid
            )
            return protocol.error(
                ErrorCode.FORBIDDEN, "this peer may not change the whitelist"
            ), True
        try:
            return self._execute(request, peer), request.verb is not Verb.QUIT
        except StoreUnavailable as failure:
            self._log.error("ingest_store_unavailable", verb=request.verb.value, error=str(failure))
            return protocol.error(ErrorCode.UNAVAILABLE, "whitelist store unavailable"), True

    def _execute(self, request: Request, peer: Peer) -> bytes:
        verb = request.verb
        if verb is Verb.PING:
            return protocol.ok("pong")
        if verb is Verb.QUIT:
            return protocol.ok("bye")
        if verb is Verb.STATS:
            return protocol.ok(protocol.stats_fields(self._store.stats()))
        if verb is Verb.LIST:
            return protocol.list_reply(
                protocol.format_grant(grant, self._keying.describe(grant.address))
                for grant in self._store.entries()
            )
        assert request.address is not None  # every other verb takes an address
        key = self._keying.key_address(request.address)
        described = self._keying.describe(key)
        if verb is Verb.LOGIN:
            outcome = self._store.grant(key, request.user)
            if outcome.evicted is not None:
                self._log.warning(
                    "whitelist_full_evicted",
                    evicted=self._keying.describe(outcome.evicted.address),
                    evicted_user=outcome.evicted.user,
                )
            self._log.info(
                "login",
                client_ip=described,
                user=request.user or None,
                renewed=outcome.renewed,
                peer_uid=peer.uid,
            )
            renewed = "yes" if outcome.renewed else "no"
            return protocol.ok(
                f"{protocol.format_grant(outcome.grant, described)} renewed={renewed}"
            )
        if verb is Verb.REVOKE:
            removed = self._store.revoke(key)
            self._log.info(
                "revoke", client_ip=described, found=removed is not None, peer_uid=peer.uid
            )
            if removed is None:
                return protocol.not_found(described)
            return protocol.ok(protocol.format_grant(removed, described))
        grant = self._store.lookup(key)
        if grant is None:
            return protocol.not_found(described)
        return protocol.ok(protocol.format_grant(grant, described))
