"""The listening socket: HTTP or HTTPS, with a cap on concurrent client connections.

aiohttp has no such cap, so the site hands each new connection past the cap a protocol
that answers 503 and closes, instead of the request handler. With worker processes, each
process has a site on the same port (SO_REUSEPORT), and the cap is per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import AsyncIterator, Coroutine

from aiohttp import web
from prometheus_client import Counter

from mirror import logs
from mirror.config import Config, server_ssl_context
from mirror.errors import ConfigError
from mirror.web.middleware import METRICS

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT = 30.0  # SIGTERM: responses under way get this long to finish

REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n"
    b"Connection: close\r\n\r\n"
)


class _Refuse(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(REFUSAL)
        transport.close()


class CappedSite(web.TCPSite):
    def __init__(
        self,
        runner: web.AppRunner,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None,
        max_connections: int,
        refused: Counter,
        reuse_port: bool = False,
    ) -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context, reuse_port=reuse_port)
        self.max_connections = max_connections
        self.refused = refused
        self._warned = False

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site; TCPSite.start would bind
        server = self._runner.server
        assert server is not None

        def protocol() -> asyncio.BaseProtocol:
            if len(server.connections) < self.max_connections:
                self._warned = False
                return server()
            self.refused.inc()
            if not self._warned:
                self._warned = True
                log.warning(
                    "%d client connections open: refusing new ones with 503 (limits."
                    "max_connections; logged once until one is accepted again)",
                    self.max_connections,
                )
            return _Refuse()

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            protocol, self._host, self._port, ssl=self._ssl_context, reuse_port=self._reuse_port
        )


def run_until_stopped(main: Coroutine[object, object, None]) -> None:
    """Run `main` on a new loop until it ends, or SIGTERM or SIGINT (then it is cancelled
    and its cleanup runs)."""
    loop = asyncio.new_event_loop()
    task = loop.create_task(main)
    try:
        loop.run_until_complete(task)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(task)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


@contextlib.asynccontextmanager
async def serving(app: web.Application, config: Config) -> AsyncIterator[web.AppRunner]:
    """What `web.run_app` does, with our own site (it caps client connections), on a port
    that other worker processes share when there are any."""
    runner = web.AppRunner(
        app,
        handle_signals=True,
        access_log=logging.getLogger(logs.ACCESS),
        access_log_class=logs.AccessLogger,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        max_line_size=config.limits.max_header_size,
        max_field_size=config.limits.max_header_size,
    )
    await runner.setup()
    try:
        site = CappedSite(
            runner,
            config.listen.host,
            config.listen.port,
            ssl_context=server_ssl_context(config.tls) if config.tls else None,
            max_connections=config.limits.max_connections,
            refused=app[METRICS].connections_refused,
            reuse_port=config.workers > 1,
        )
        try:
            await site.start()
        except OSError as exc:
            raise cannot_listen(config, exc) from None
        yield runner
    finally:
        await runner.cleanup()


def cannot_listen(config: Config, exc: OSError) -> ConfigError:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)  # asyncio's repeats the address
    return ConfigError("listen", f"cannot listen on {config.listen}: {reason}")
