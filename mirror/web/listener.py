"""The listening socket: HTTP or HTTPS, with a cap on concurrent client connections.

aiohttp has no such cap, so the site hands each new connection past the cap a protocol
that answers 503 and closes, instead of the request handler.
"""

from __future__ import annotations

import asyncio
import logging
import ssl

from aiohttp import web
from prometheus_client import Counter

log = logging.getLogger(__name__)

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
    ) -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context)
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
            protocol, self._host, self._port, ssl=self._ssl_context
        )
