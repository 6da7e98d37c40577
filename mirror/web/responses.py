"""Responses made from what the proxies answer: a blob (a cached file, a growing download,
a size) or a manifest, with the conditional requests and ranges HTTP defines.

A `BlobResponse` sends itself, as aiohttp's FileResponse does: its headers, then its bytes
with sendfile straight from the file (cached or growing), copied through Python only for
chunked answers (which need framing) and TLS (which encrypts in Python), and from memory
for a blob passing through uncached.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from contextlib import aclosing
from functools import partial

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter

from mirror.errors import RegistryError
from mirror.logs import CACHE_RESULT
from mirror.proxy.blobs import Blob, BlobSize, CachedBlob, Download, Redirect
from mirror.proxy.manifests import Manifest
from mirror.proxy.sinks import Span
from mirror.reference import ByteRange, Digest, parse_range
from mirror.web.middleware import METRICS

log = logging.getLogger(__name__)

OCTET_STREAM = "application/octet-stream"
COPY_CHUNK = 256 * 1024  # bytes read at a time where sendfile cannot be used


def unchanged(request: web.Request, digest: Digest) -> bool:
    """Whether the client has these bytes already: its `If-None-Match` is `*` or lists
    the ETag, the digest (compared weakly, `W/` or not, as HTTP says for this header).
    Answered only once the content was found: `*` means "if it exists"."""
    header = request.headers.get(hdrs.IF_NONE_MATCH)
    if header is None:
        return False
    if header.strip(" \t") == "*":
        return True
    value = str(digest)
    return any(tag.value == value for tag in request.if_none_match or ())


def not_modified(digest: Digest) -> web.Response:
    """A 304: no body, and of the headers a 200 would carry, those naming the content."""
    return web.Response(
        status=304, headers={"Docker-Content-Digest": str(digest), "ETag": f'"{digest}"'}
    )


def _counted(request: web.Request, kind: str, result: str) -> None:
    request.app[METRICS].cache_result(kind, result)
    request[CACHE_RESULT] = result


def _source(result: str) -> str:
    """Where the bytes served came from, for `mirror_served_bytes_total`."""
    return {"miss": "upstream", "shared": "shared"}.get(result, "cache")


def manifest_response(request: web.Request, found: Manifest) -> web.Response:
    _counted(request, "manifest", found.result)
    if unchanged(request, found.digest):
        return not_modified(found.digest)
    if request.method == "GET":
        request.app[METRICS].served(_source(found.result), len(found.body))
    return web.Response(
        body=found.body,
        headers={
            "Content-Type": found.media_type,
            "Docker-Content-Digest": str(found.digest),
            "ETag": f'"{found.digest}"',
        },
    )


async def blob_response(
    request: web.Request, found: Blob, digest: Digest, *, client_has_it: bool
) -> web.StreamResponse:
    """The answer for `found`, sent before this returns (`found` is open only meanwhile);
    `client_has_it`: `unchanged(request, digest)`, which the caller asked already."""
    _counted(request, "blob", found.result)
    if client_has_it:
        return not_modified(digest)
    if isinstance(found, Redirect):
        # The bucket answers with the bytes (and the ranges); clients follow a 307.
        raise web.HTTPTemporaryRedirect(found.url, headers={"Docker-Content-Digest": str(digest)})
    response = BlobResponse(found, digest)
    await response.prepare(request)
    await response.write_eof()
    return response


class BlobResponse(web.StreamResponse):
    def __init__(self, found: CachedBlob | Download | BlobSize, digest: Digest) -> None:
        super().__init__(
            headers={
                "Docker-Content-Digest": str(digest),
                "Content-Type": OCTET_STREAM,
                "ETag": f'"{digest}"',
                "Accept-Ranges": "bytes",
            }
        )
        self._found = found

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            return await super().prepare(request)
        found = self._found
        # A size without bytes has no range to send; without a size no range can be placed.
        byte_range = None if isinstance(found, BlobSize) else self._range(request, found.size)
        if byte_range is not None and found.size is not None:
            self.set_status(206)
            self.headers[hdrs.CONTENT_RANGE] = byte_range.content_range(found.size)
            self.content_length = byte_range.length
        elif found.size is not None:
            self.content_length = found.size
        writer = await super().prepare(request)
        if request.method == "GET":
            assert isinstance(request, web.Request)
            served = partial(request.app[METRICS].served, _source(found.result))
            if isinstance(found, CachedBlob):
                await self._send_file(request, found, byte_range, served)
            elif isinstance(found, Download):
                await self._stream(request, found, byte_range, served)
        return writer

    def _range(self, request: web.BaseRequest, length: int | None) -> ByteRange | None:
        """The part to send; None for all of it, also when `If-Range` holds anything but
        the ETag (compared strongly): a date, too, as no Last-Modified is sent."""
        header = request.headers.get(hdrs.RANGE)
        if header is None or length is None:
            return None
        validator = request.headers.get(hdrs.IF_RANGE)
        if validator is not None and validator.strip(" \t") != self.headers[hdrs.ETAG]:
            return None
        return parse_range(header, length)

    async def _send_file(
        self,
        request: web.Request,
        found: CachedBlob,
        byte_range: ByteRange | None,
        served: Callable[[int], None],
    ) -> None:
        start, count = (byte_range.start, byte_range.length) if byte_range else (0, found.size)
        if count:
            served(await self._send(request, Span(found.file, start, count)))

    async def _stream(
        self,
        request: web.Request,
        found: Download,
        byte_range: ByteRange | None,
        served: Callable[[int], None],
    ) -> None:
        """A blob being downloaded, from the growing file (or memory) as it arrives."""
        try:
            async with aclosing(found.reader.chunks(byte_range)) as chunks:
                async for piece in chunks:
                    served(await self._send(request, piece))
        except RegistryError as error:
            # Headers are gone already: cutting the connection is the only way to say so.
            log.warning("cut %s %s mid-body: %s", request.method, request.path, error.message)
            if request.transport is not None:
                request.transport.close()

    async def _send(self, request: web.Request, piece: Span | bytes) -> int:
        if isinstance(piece, bytes):
            await self.write(piece)
            return len(piece)
        transport = request.transport
        if transport is None:
            raise ConnectionResetError("the client went away")
        if self.content_length is None or transport.get_extra_info("sslcontext") is not None:
            await self._copy(piece)
            return piece.count
        sent = _sendfile_now(transport, piece)
        if sent < piece.count:
            rest = Span(piece.file, piece.offset + sent, piece.count - sent)
            try:  # from the page cache to the socket, no copy through Python
                await asyncio.get_running_loop().sendfile(
                    transport, rest.file, rest.offset, rest.count, fallback=False
                )
            except (NotImplementedError, asyncio.SendfileNotAvailableError):  # before any byte
                await self._copy(rest)
        return piece.count

    async def _copy(self, piece: Span) -> None:
        """Not asyncio's sendfile fallback: it seeks the file, whose offset all readers
        share."""
        fd, offset, end = piece.file.fileno(), piece.offset, piece.offset + piece.count
        while offset < end:
            data = os.pread(fd, min(COPY_CHUNK, end - offset), offset)
            if not data:
                raise OSError(f"{piece.file.name} is shorter than the bytes written to it")
            await self.write(data)
            offset += len(data)


def _sendfile_now(transport: asyncio.BaseTransport, piece: Span) -> int:
    """What the socket takes at once, straight from the file; all of a small blob, often.

    `loop.sendfile` alone costs a round of the loop and its bookkeeping per call, which is
    a good part of a cache hit's time. Only with nothing buffered in the transport, so
    the bytes cannot overtake the headers.
    """
    sock = transport.get_extra_info("socket")
    if sock is None or not isinstance(transport, asyncio.WriteTransport):
        return 0
    if transport.get_write_buffer_size():
        return 0
    try:
        return os.sendfile(sock.fileno(), piece.file.fileno(), piece.offset, piece.count)
    except (BlockingIOError, InterruptedError):
        return 0
