"""The listening socket, HTTP or HTTPS, and the server's life from start to SIGTERM.

Client connections are capped: aiohttp has no such cap, so the site hands each new
connection past it a protocol that answers 503 and closes, instead of a `Connection`.
The cap is `limits.max_connections`, or fewer when the open-files limit would run out
first. With worker processes, each process has a site on the same port (SO_REUSEPORT),
and the cap is per process.

Accepting is done here, not by asyncio's server: when the process has no descriptor left
(EMFILE), asyncio retries the failed accept up to a hundred times per wake-up, schedules
as many retries, and logs a traceback for each, which kept the loop busy and wrote tens
of MB a minute. Here accepting pauses for ACCEPT_PAUSE instead, logged once per episode.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import signal
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from aiohttp import web
from prometheus_client import Counter

from mirror import logs
from mirror.config import Config, server_ssl_context
from mirror.errors import ConfigError
from mirror.web.connection import Connection
from mirror.web.middleware import ANSWERS, METRICS

log = logging.getLogger(__name__)
episodes = logs.Episodes(log)

SHUTDOWN_TIMEOUT = 30.0  # SIGTERM: the process has exited within this...
SHUTDOWN_GRACE = 25.0  # ...answers under way get this long to finish, then are cut
BACKLOG = 128  # connections the kernel queues before they are accepted
# Connections accepted per wake-up, at most: each holds a descriptor until its task runs,
# in the next round of the loop (FD_RESERVE covers them).
ACCEPT_BATCH = 32
ACCEPT_PAUSE = 0.5  # seconds without accepting once the process is out of descriptors
OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Descriptors kept for all but client connections: the index, logs, listening sockets,
# hand-offs; and per download an upstream socket and its temp file.
FD_RESERVE = 64
FDS_PER_DOWNLOAD = 2
FDS_PER_CONNECTION = 2  # its socket, and the blob file it is answered from

REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n"
    b"Connection: close\r\n\r\n"
)

ConnectionFactory = Callable[[], web.RequestHandler]


def raise_open_files_limit() -> tuple[int, int]:
    """The soft limit on open descriptors raised to the hard one, (before, after): systemd
    and login shells start processes at 1024, which a thousand slow clients exhaust."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return soft, hard


def open_files_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def connection_cap(config: Config, open_files: int) -> int:
    """Client connections one process holds at once: `limits.max_connections`, or fewer
    when the process would run out of descriptors first."""
    if open_files == resource.RLIM_INFINITY:
        return config.limits.max_connections
    downloads = sum(upstream.max_fetches for upstream in config.upstreams)
    spare = open_files - FD_RESERVE - FDS_PER_DOWNLOAD * downloads
    return max(1, min(config.limits.max_connections, spare // FDS_PER_CONNECTION))


class _Refuse(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(REFUSAL)
        transport.close()


class Listener(asyncio.AbstractServer):
    """Listening sockets whose connections go to `protocol()`; when that is None, they
    are answered 503 and closed (over plain HTTP at once, without a transport, so that
    the descriptor is free again)."""

    def __init__(
        self,
        sockets: list[socket.socket],
        protocol: Callable[[], asyncio.BaseProtocol | None],
        ssl_context: ssl.SSLContext | None,
        handshake_timeout: float,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._sockets = sockets
        self._protocol = protocol
        self._ssl_context = ssl_context
        self._handshake_timeout = handshake_timeout if ssl_context else None
        self._tasks: set[asyncio.Task[None]] = set()  # connecting accepted sockets
        self._starting: set[asyncio.Task[Any]] = set()  # ...of those, with a protocol
        self._retry: asyncio.TimerHandle | None = None
        self._starved_since: float | None = None  # out of descriptors since
        self._serving = False
        self._closed = asyncio.Event()

    @property
    def starting(self) -> int:
        """Connections accepted and given a protocol, not yet connected to it: aiohttp
        counts a connection only from then on (after the TLS handshake, if any)."""
        return len(self._starting)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        if not self._serving and not self._closed.is_set():
            self._serving = True
            self._watch()

    async def serve_forever(self) -> None:
        await self.start_serving()
        await self.wait_closed()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._serving = False
        self._unwatch()
        if self._retry is not None:
            self._retry.cancel()
        for sock in self._sockets:
            sock.close()
        for task in self._tasks:
            task.cancel()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def _watch(self) -> None:
        for sock in self._sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _unwatch(self) -> None:
        for sock in self._sockets:
            if sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                client, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                self._caught_up()
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in OUT_OF_DESCRIPTORS:
                    self._starve(exc)
                else:
                    log.warning("accepting a connection failed: %s", exc)
                return
            self._start(client)

    def _caught_up(self) -> None:
        """Every connection waiting was accepted: an episode without descriptors ends
        here, not at the first accept, which the next might follow into EMFILE again."""
        if self._starved_since is not None:
            log.info(
                "accepting connections again, after %.1fs short of descriptors",
                self._loop.time() - self._starved_since,
            )
            self._starved_since = None

    def _starve(self, exc: OSError) -> None:
        """Out of descriptors: stop watching the sockets for a moment, which would
        otherwise wake the loop again at once for an accept that fails again."""
        self._unwatch()
        self._retry = self._loop.call_later(ACCEPT_PAUSE, self._resume)
        if self._starved_since is None:
            self._starved_since = self._loop.time()
            log.warning(
                "cannot accept connections: %s (open files limit %d); trying again every "
                "%.1fs (logged once until every waiting connection is accepted)",
                exc.strerror,
                open_files_limit(),
                ACCEPT_PAUSE,
            )

    def _resume(self) -> None:
        self._retry = None
        if self._serving:
            self._watch()

    def _start(self, client: socket.socket) -> None:
        client.setblocking(False)
        task = self._loop.create_task(self._connect(client))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, client: socket.socket) -> None:
        # The protocol is chosen in the task, a round of the loop after the accept: by
        # then a connection the same wake-up saw closing has been let go.
        protocol = self._protocol()
        if protocol is None and self._ssl_context is None:
            with contextlib.suppress(OSError):  # a new socket's buffer takes the few bytes
                client.send(REFUSAL)
            client.close()
            return
        if protocol is None:
            protocol = _Refuse()  # said over TLS, once the handshake is done
        task = asyncio.current_task()
        assert task is not None
        self._starting.add(task)
        try:
            await self._loop.connect_accepted_socket(
                lambda: protocol,
                client,
                ssl=self._ssl_context,
                ssl_handshake_timeout=self._handshake_timeout,
            )
        except (OSError, TimeoutError) as exc:
            # A TLS handshake that failed or timed out, a client that left at once.
            log.debug("a connection ended before it was served: %r", exc)
        finally:
            self._starting.discard(task)


class CappedSite(web.TCPSite):
    def __init__(
        self,
        runner: web.AppRunner,
        host: str,
        port: int,
        *,
        connection: ConnectionFactory,
        ssl_context: ssl.SSLContext | None,
        max_connections: int,
        handshake_timeout: float,
        refused: Counter,
        reuse_port: bool = False,
    ) -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context, reuse_port=reuse_port)
        self.connection = connection
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.refused = refused

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site; TCPSite.start would bind
        sockets = await _bind(self._host or "0.0.0.0", self._port, bool(self._reuse_port))
        listener = Listener(sockets, self._protocol, self._ssl_context, self.handshake_timeout)
        self._server = listener
        await listener.start_serving()

    def _protocol(self) -> asyncio.BaseProtocol | None:
        """A `Connection`, or None past the cap."""
        server = self._runner.server
        assert server is not None
        listener = self._server
        assert isinstance(listener, Listener)
        # aiohttp keeps a connection in its list until its task ends, closed or not.
        open_connections = sum(1 for c in server.connections if c.transport is not None)
        if open_connections + listener.starting < self.max_connections:
            return self.connection()
        self.refused.inc()
        episodes.log(
            logging.WARNING,
            "refused",
            "%d client connections open: refusing new ones with 503 (limits.max_connections, "
            "or the open files limit)",
            self.max_connections,
        )
        return None


async def _bind(host: str, port: int, reuse_port: bool) -> list[socket.socket]:
    """A listening socket for each address `host` names (`localhost`: IPv4 and IPv6)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, _, _, _, address in dict.fromkeys(infos):
            sock = socket.create_server(
                address, family=family, backlog=BACKLOG, reuse_port=reuse_port
            )
            sock.setblocking(False)
            sockets.append(sock)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def run_until_stopped(main: Coroutine[object, object, None]) -> None:
    """Run `main` on a new loop until it ends, or SIGTERM or SIGINT cancels it: once, so
    that its cleanup then runs undisturbed. Should that outlast SHUTDOWN_TIMEOUT, the
    process exits there and then (the index is left as after a crash, which reconcile
    handles at the next start)."""
    loop = asyncio.new_event_loop()
    task = loop.create_task(main)
    stopping: list[asyncio.TimerHandle] = []

    def stop() -> None:
        if not stopping:
            task.cancel()
            stopping.append(loop.call_later(SHUTDOWN_TIMEOUT, _abandon))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)
    try:
        loop.run_until_complete(task)
    except asyncio.CancelledError:
        pass
    finally:
        for handle in stopping:
            handle.cancel()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def _abandon() -> None:
    # Not sys.exit: threads still running (an index's) would keep the process alive.
    log.error("still stopping after %.0fs: exiting anyway", SHUTDOWN_TIMEOUT)
    logging.shutdown()
    os._exit(1)


@contextlib.asynccontextmanager
async def serving(app: web.Application, config: Config) -> AsyncIterator[ConnectionFactory]:
    """What `web.run_app` does, with our own site (it caps client connections, and times
    out clients' headers), on a port that other worker processes share when there are
    any. Yields what makes a `Connection`, for connections accepted elsewhere."""
    limits = config.limits
    options: dict[str, Any] = {
        "access_log": logging.getLogger(logs.ACCESS),
        "access_log_class": logs.AccessLogger,
        "max_line_size": limits.max_header_size,
        "max_field_size": limits.max_header_size,
        "keepalive_timeout": limits.keepalive_timeout,
    }
    app.on_shutdown.append(_finish_answers)
    # By then the answers were let finish or cut (on_shutdown): this bounds what aiohttp
    # then waits for, which is twice this timeout for an answer that does not end.
    runner = web.AppRunner(app, shutdown_timeout=1.0, **options)
    await runner.setup()
    try:
        server = runner.server
        assert server is not None

        def connection() -> Connection:
            return Connection(
                server,
                loop=asyncio.get_running_loop(),
                header_timeout=limits.header_timeout,
                **options,
            )

        site = CappedSite(
            runner,
            config.listen.host,
            config.listen.port,
            connection=connection,
            ssl_context=server_ssl_context(config.tls) if config.tls else None,
            max_connections=connection_cap(config, open_files_limit()),
            handshake_timeout=limits.header_timeout,
            refused=app[METRICS].connections_refused,
            reuse_port=config.workers > 1,
        )
        try:
            await site.start()
        except OSError as exc:
            raise cannot_listen(config, exc) from None
        yield connection
    finally:
        await _uninterrupted(runner.cleanup())


async def _uninterrupted(cleanup: Coroutine[object, object, None]) -> None:
    """`cleanup` run to its end even when this task is cancelled meanwhile (SIGTERM to a
    worker whose primary just went away, say), then the cancellation passed on: cut
    short, it would leave the index open, and its thread would keep the process alive."""
    running = asyncio.ensure_future(cleanup)
    try:
        await asyncio.shield(running)
    except asyncio.CancelledError:
        await running
        raise


async def _finish_answers(app: web.Application) -> None:
    """SIGTERM, once the port is closed: answers under way get SHUTDOWN_GRACE to end."""
    answers = app[ANSWERS]
    if len(answers):
        log.info("stopping: %d answers under way get up to %.0fs", len(answers), SHUTDOWN_GRACE)
    cut = await answers.finish(SHUTDOWN_GRACE)
    if cut:
        log.warning("stopping: cut %d answers still running after %.0fs", cut, SHUTDOWN_GRACE)


def cannot_listen(config: Config, exc: OSError) -> ConfigError:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)  # asyncio's repeats the address
    return ConfigError("listen", f"cannot listen on {config.listen}: {reason}")
