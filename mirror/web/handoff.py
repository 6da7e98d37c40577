"""Handing a client connection from a worker process to the primary one.

With `workers` > 1, every process listens on the port (SO_REUSEPORT: the kernel spreads
the connections over them). A worker answers only what the cache alone can answer: cached
blobs and manifests by digest. Everything else (a miss, a tag, /metrics, ...) needs the
primary, where downloads are shared, the budget is kept and the evictor runs. So the
worker sends the primary the connection itself, its descriptor over a Unix socket with the
request head already read, and the primary answers that request, and any later one on the
connection, as if it had accepted it. No byte of an answer goes through two processes.

The head is rebuilt from what aiohttp parsed (method, path, version, raw headers). Only
bodiless GET and HEAD requests are handed over, and registry clients wait for each answer
before the next request, so nothing else can be buffered in the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable

from aiohttp import web

from mirror.errors import Busy
from mirror.logs import HANDED_OFF

log = logging.getLogger(__name__)

HEAD_LIMIT = 64 * 1024  # bytes of request head a hand-off carries
SEND_TIMEOUT = 10.0  # seconds a hand-off waits for room in the primary's queue


class HandedOff(web.StreamResponse):
    """A worker's answer to a request it handed over: nothing, the primary answers."""

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


class Sender:
    """A worker's end: one Unix socket to the primary."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock.setblocking(False)
        self._room_waiter: asyncio.Future[None] | None = None

    async def connect(self) -> None:
        await asyncio.get_running_loop().sock_connect(self._sock, self.path)

    async def closed(self) -> None:
        """Until the primary closes its end (it stopped)."""
        await asyncio.get_running_loop().sock_recv(self._sock, 1)

    def close(self) -> None:
        self._sock.close()

    async def hand_off(self, request: web.Request) -> HandedOff:
        client = request.transport.get_extra_info("socket") if request.transport else None
        if client is None:
            raise ConnectionResetError("the client went away")
        head = _head(request)
        if len(head) > HEAD_LIMIT:
            raise Busy(f"request headers over {HEAD_LIMIT} bytes cannot be handed over")
        # Our own descriptor: should the client go away while this waits, the transport's
        # number could be reused by another connection before it is sent.
        fd = os.dup(client.fileno())
        try:
            async with asyncio.timeout(SEND_TIMEOUT):
                await self._send(head, fd)
        except (OSError, TimeoutError) as exc:
            raise Busy(f"the primary process does not take the request: {exc!r}") from None
        finally:
            os.close(fd)
        # Closes this process's descriptor only: the connection lives on in the primary.
        request.protocol.force_close()
        request[HANDED_OFF] = True
        return HandedOff()

    async def _send(self, head: bytes, fd: int) -> None:
        """Waiting while the primary's queue is full (a burst of hand-offs, a busy loop)."""
        while True:
            try:
                socket.send_fds(self._sock, [head], [fd])
                return
            except BlockingIOError:
                await self._room()

    async def _room(self) -> None:
        """Until the socket takes messages again: one wait that every queued hand-off
        shares (the loop keeps one writer callback per socket)."""
        if self._room_waiter is None:
            loop = asyncio.get_running_loop()
            self._room_waiter = loop.create_future()
            loop.add_writer(self._sock, self._has_room)
        await asyncio.shield(self._room_waiter)

    def _has_room(self) -> None:
        asyncio.get_running_loop().remove_writer(self._sock)
        waiter, self._room_waiter = self._room_waiter, None
        if waiter is not None:
            waiter.set_result(None)


def _head(request: web.BaseRequest) -> bytes:
    version = request.version
    lines = [f"{request.method} {request.raw_path} HTTP/{version.major}.{version.minor}".encode()]
    # The body, if any, was read and dropped: the primary must not wait for one.
    lines += [
        name + b": " + value
        for name, value in request.raw_headers
        if name.lower() not in (b"content-length", b"transfer-encoding")
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n"


class Receiver:
    """The primary's end: takes handed-over connections into its aiohttp server."""

    def __init__(self, path: str, server: Callable[[], web.RequestHandler]) -> None:
        self.path = path
        self.server = server
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._workers: list[socket.socket] = []
        self._adopting: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._listener.bind(self.path)
        self._listener.listen()
        self._listener.setblocking(False)
        asyncio.get_running_loop().add_reader(self._listener, self._accept)

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in [self._listener, *self._workers]:
            loop.remove_reader(sock)
            sock.close()
        self._workers.clear()

    def _accept(self) -> None:
        with contextlib.suppress(BlockingIOError):
            worker, _ = self._listener.accept()
            worker.setblocking(False)
            self._workers.append(worker)
            asyncio.get_running_loop().add_reader(worker, self._receive, worker)

    def _receive(self, worker: socket.socket) -> None:
        """Every hand-off queued on this worker's socket."""
        while self._receive_one(worker):
            pass

    def _receive_one(self, worker: socket.socket) -> bool:
        try:
            head, fds, flags, _ = socket.recv_fds(worker, HEAD_LIMIT, 1)
        except BlockingIOError:
            return False
        except OSError as exc:
            log.warning("hand-off channel from a worker failed: %s", exc)
            head, fds, flags = b"", [], 0
        if not head and not fds:  # the worker exited
            asyncio.get_running_loop().remove_reader(worker)
            self._workers.remove(worker)
            worker.close()
            return False
        for fd in fds:
            client = socket.socket(fileno=fd)
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                client.close()  # the worker never sends these: drop rather than misparse
                continue
            task = asyncio.create_task(self._adopt(client, head))
            self._adopting.add(task)
            task.add_done_callback(self._adopting.discard)
        return True

    async def _adopt(self, client: socket.socket, head: bytes) -> None:
        handler = self.server()
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: handler, client)
        except OSError as exc:
            log.debug("a handed-over connection closed before it was taken: %s", exc)
            client.close()
            return
        handler.data_received(head)
