"""One client connection: aiohttp's handler, with a deadline on each request's headers,
and quiet about bytes that are not a request.

aiohttp closes a connection that waits for its next request longer than its keep-alive
timeout (counted from the connection's start and from each answer, however many bytes
trickle in meanwhile), but knows no shorter bound for a request's headers: thousands of
clients that connect and send nothing, or a header a byte at a time, would each hold a
connection, and the connection cap, that long. So a connection must complete each
request's headers within `header_timeout`: counted from its start, and from the first
byte of each later request.

Bytes aiohttp cannot parse as a request (a TLS ClientHello, which skopeo and podman send
before falling back to plain HTTP; headers over the size limit) are the client's doing:
they get aiohttp's 400 as before, but one log line per episode instead of an ERROR
traceback and an access line each.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong

from mirror.logs import MALFORMED, Episodes

log = logging.getLogger(__name__)
episodes = Episodes(log)

TLS_HANDSHAKE = b"\x16\x03"  # a TLS record's first bytes: handshake, protocol version 3.x


class Connection(web.RequestHandler):
    def __init__(self, manager: web.Server, *, header_timeout: float, **options: Any) -> None:
        super().__init__(manager, **options)
        self.header_timeout = header_timeout
        # When the headers now awaited must be complete; None while none are awaited. One
        # timer per connection checks it, moved on only when it fires: starting and
        # cancelling a timer for every request was a good part of a cached answer's cost.
        self._headers_due: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tls_probe: bool | None = None  # known from the connection's first bytes

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._await_headers()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._tls_probe is None:
            self._tls_probe = data.startswith(TLS_HANDSHAKE)
        if self._headers_due is None:
            self._await_headers()
        # aiohttp counts the request heads it has parsed on this connection.
        heads = self._request_count
        super().data_received(data)
        if self._request_count != heads:
            self._headers_due = None

    def _await_headers(self) -> None:
        self._headers_due = self._loop.time() + self.header_timeout
        if self._timer is None:
            self._timer = self._loop.call_at(self._headers_due, self._check_headers)

    def _check_headers(self) -> None:
        self._timer = None
        due = self._headers_due
        if due is None:
            return
        if due > self._loop.time():  # a later request's, awaited since this timer started
            self._timer = self._loop.call_at(due, self._check_headers)
            return
        self._headers_due = None
        # Bytes that came while a request was being answered (its body) started the
        # deadline too: only a connection still waiting for a request is overdue, which
        # aiohttp tells by its pending waiter, as its own keep-alive check does.
        if self._waiter is None or self._waiter.done():
            return
        episodes.log(
            logging.INFO,
            "header_timeout",
            "closed a connection that sent no complete request headers within %.0fs "
            "(limits.header_timeout)",
            self.header_timeout,
        )
        self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        request[MALFORMED] = True
        if self._tls_probe:
            episodes.log(
                logging.INFO,
                "tls",
                "a client spoke TLS to this plain-HTTP port (skopeo and podman try HTTPS "
                "first, then HTTP): answered %d",
                status,
            )
        elif isinstance(exc, LineTooLong):
            episodes.log(
                logging.WARNING,
                "too_long",
                "a request line or header over %d bytes (limits.max_header_size): answered %d",
                self.max_field_size,
                status,
            )
        else:
            episodes.log(
                logging.WARNING,
                "malformed",
                "a request that is not valid HTTP: answered %d: %s",
                status,
                exc.message,
            )
        # What aiohttp answers, without its ERROR line and traceback.
        response = web.Response(status=status, text=message, content_type="text/plain")
        response.force_close()
        return response
