"""The /v2/ routes of the OCI distribution API, read side.

Each handler parses and validates what the client sent (reference.py), asks the
pull-through proxy, and turns its answer into a response. Push methods are refused.

A worker process (`workers` > 1) has routes of its own, `add_worker_routes`: it answers
cache hits the same way, and hands every other request to the primary (handoff.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from contextlib import aclosing

from aiohttp import hdrs, web
from yarl import URL

from mirror.access import Gate
from mirror.errors import (
    LoginRequired,
    PaginationInvalid,
    RegistryError,
    Unsupported,
)
from mirror.logs import CACHE_RESULT, UPSTREAM_NAME
from mirror.proxy.blobs import BlobProxy, CachedBlob
from mirror.proxy.fetch import BlobReader
from mirror.proxy.manifests import Manifest, ManifestProxy
from mirror.proxy.sinks import Span
from mirror.reference import (
    OCI_INDEX,
    ByteRange,
    Digest,
    parse_accept,
    parse_digest,
    parse_manifest_reference,
    parse_range,
    validate_name,
)
from mirror.upstream.client import Upstream
from mirror.upstream.routing import Router
from mirror.web.handoff import Sender
from mirror.web.middleware import METRICS

log = logging.getLogger(__name__)

GATE = web.AppKey("gate", Gate)
BLOBS = web.AppKey("blobs", BlobProxy)
MANIFESTS = web.AppKey("manifests", ManifestProxy)
ROUTER = web.AppKey("router", Router)
UPSTREAMS = web.AppKey("upstreams", dict[str, Upstream])
NAMESPACE = web.RequestKey("namespace", str)  # the `ns` that chose the upstream
SENDER = web.AppKey("sender", Sender)  # a worker's channel to the primary

OCTET_STREAM = "application/octet-stream"
COPY_CHUNK = 256 * 1024  # bytes read at a time where sendfile cannot be used
_DIGITS = re.compile(r"[0-9]+")  # ASCII only: `str.isdigit` takes "²", which int() refuses
_MAX_N_DIGITS = 9  # an `n` this long asks for more tags than any repository has


def add_routes(app: web.Application) -> None:
    name = "/v2/{name:[^?#]+?}"
    app.router.add_get("/v2/", ping, name="ping")
    app.router.add_get(name + "/manifests/{reference}", manifest, name="manifest")
    app.router.add_get(name + "/blobs/{digest}", blob, name="blob")
    app.router.add_get(name + "/tags/list", tags, name="tags")
    app.router.add_get(name + "/referrers/{digest}", referrers, name="referrers")
    app.router.add_route("*", "/v2/{tail:.*}", not_supported, name="unsupported")
    app.on_response_prepare.append(_echo_namespace)


def add_worker_routes(app: web.Application) -> None:
    name = "/v2/{name:[^?#]+?}"
    app.router.add_get(name + "/manifests/{reference}", cached_manifest, name="manifest")
    app.router.add_get(name + "/blobs/{digest}", cached_blob, name="blob")
    app.router.add_route("*", "/{tail:.*}", hand_off, name="hand_off")
    app.on_response_prepare.append(_echo_namespace)


async def hand_off(request: web.Request) -> web.StreamResponse:
    """To the primary: the request, and the connection with it."""
    if request.method not in ("GET", "HEAD"):
        return await not_supported(request)
    await request.release()  # a body nobody reads, so the head is all there is to send
    return await request.app[SENDER].hand_off(request)


async def cached_manifest(request: web.Request) -> web.StreamResponse:
    upstream, _ = await _upstream(request)
    reference = parse_manifest_reference(request.match_info["reference"])
    parse_accept(request.headers.getall("Accept", ()))
    if isinstance(reference, Digest):
        found = await request.app[MANIFESTS].cached(upstream, reference)
        if found is not None:
            return _manifest_response(request, found)
    return await hand_off(request)


async def cached_blob(request: web.Request) -> web.StreamResponse:
    upstream, _ = await _upstream(request)
    digest = parse_digest(request.match_info["digest"])
    cached = request.app[BLOBS].local(upstream, digest)
    if cached is not None:
        with cached:
            return await _hit(request, cached, digest)
    return await hand_off(request)


async def _upstream(request: web.Request) -> tuple[Upstream, str]:
    """The upstream this request is for, and the repository's name there; for an
    `authenticated` upstream, only with a login to the mirror."""
    name = validate_name(request.match_info["name"])
    route = request.app[ROUTER].route(name, request.query.get("ns"))
    if route.namespace is not None:
        request[NAMESPACE] = route.namespace
    request[UPSTREAM_NAME] = route.upstream.name
    if route.upstream.access == "authenticated":
        await _login(request)
    return request.app[UPSTREAMS][route.upstream.name], route.repository


async def _login(request: web.Request) -> None:
    await request.app[GATE].require(request.headers.get("Authorization"), request.remote or "")


async def _echo_namespace(request: web.Request, response: web.StreamResponse) -> None:
    """As the distribution spec suggests for `ns`; only a namespace that routed is echoed."""
    if NAMESPACE in request:
        response.headers["OCI-Namespace"] = request[NAMESPACE]


async def ping(request: web.Request) -> web.Response:
    """With logins on, the Basic challenge goes out with a 200 as long as anonymous
    clients may pull something: podman and skopeo take a challenge from any answer to the
    ping and then send their credentials, while dockerd, without credentials for the
    mirror, would give up on a 401 and fetch from Docker Hub itself."""
    gate = request.app[GATE]
    if not gate.enabled:
        return web.json_response({})
    if not gate.anyone_may_pull or not gate.anonymous(request.headers.get("Authorization")):
        await _login(request)
    return web.json_response({}, headers=LoginRequired("").headers())


async def manifest(request: web.Request) -> web.Response:
    upstream, name = await _upstream(request)
    reference = parse_manifest_reference(request.match_info["reference"])
    accept = parse_accept(request.headers.getall("Accept", ()))
    proxy = request.app[MANIFESTS]
    if isinstance(reference, Digest):
        found = await proxy.by_digest(upstream, name, reference, accept)
    else:
        found = await proxy.by_tag(upstream, name, reference, accept)
    return _manifest_response(request, found)


def _manifest_response(request: web.Request, found: Manifest) -> web.Response:
    metrics = request.app[METRICS]
    metrics.cache_requests.labels("manifest", found.result).inc()
    request[CACHE_RESULT] = found.result
    if _unchanged(request, found.digest):
        return _not_modified(found.digest)
    if request.method == "GET":
        source = "upstream" if found.result == "miss" else "cache"
        metrics.served_bytes.labels(source).inc(len(found.body))
    return web.Response(
        body=found.body,
        headers={
            "Content-Type": found.media_type,
            "Docker-Content-Digest": str(found.digest),
            "ETag": f'"{found.digest}"',
        },
    )


async def blob(request: web.Request) -> web.StreamResponse:
    upstream, name = await _upstream(request)
    digest = parse_digest(request.match_info["digest"])
    proxy = request.app[BLOBS]
    cached = proxy.local(upstream, digest)
    if cached is not None:
        with cached:
            return await _hit(request, cached, digest)
    request.app[METRICS].cache_requests.labels("blob", "miss").inc()
    request[CACHE_RESULT] = "miss"
    if _unchanged(request, digest):
        await proxy.size(upstream, name, digest)  # that it exists: a HEAD, no download
        return _not_modified(digest)
    headers = _blob_headers(digest)
    if request.method == "HEAD":
        size = await proxy.size(upstream, name, digest)
        response = web.StreamResponse(headers=headers)
        if size is not None:
            response.content_length = size
        return response
    async with proxy.join(upstream, name, digest) as reader:
        # Without a declared length a Range cannot be placed: the whole blob, 200.
        return await _stream(request, reader, await reader.fetch.wait_started(), headers)


def _blob_headers(digest: Digest) -> dict[str, str]:
    return {
        "Docker-Content-Digest": str(digest),
        "Content-Type": OCTET_STREAM,
        "ETag": f'"{digest}"',
        "Accept-Ranges": "bytes",
    }


async def _hit(request: web.Request, cached: CachedBlob, digest: Digest) -> web.StreamResponse:
    request.app[METRICS].cache_requests.labels("blob", "hit").inc()
    request[CACHE_RESULT] = "hit"
    if _unchanged(request, digest):
        return _not_modified(digest)
    return await _send_cached(request, cached, _blob_headers(digest))


def _unchanged(request: web.Request, digest: Digest) -> bool:
    """Whether the client has these bytes already: its `If-None-Match` is `*` or lists
    the ETag, the digest (compared weakly, `W/` or not, as HTTP says for this header).
    Asked only after the content was found: `*` means "if it exists"."""
    header = request.headers.get(hdrs.IF_NONE_MATCH)
    if header is None:
        return False
    if header.strip(" \t") == "*":
        return True
    value = str(digest)
    return any(tag.value == value for tag in request.if_none_match or ())


def _not_modified(digest: Digest) -> web.Response:
    """A 304: no body, and of the headers a 200 would carry, those naming the content."""
    return web.Response(
        status=304, headers={"Docker-Content-Digest": str(digest), "ETag": f'"{digest}"'}
    )


def _range(request: web.Request, etag: str, length: int | None) -> ByteRange | None:
    """The part of the blob to send; None for all of it, also when `If-Range` holds
    anything but the ETag (compared strongly): a date, too, as no Last-Modified is sent."""
    header = request.headers.get(hdrs.RANGE)
    if header is None or length is None:
        return None
    validator = request.headers.get(hdrs.IF_RANGE)
    if validator is not None and validator.strip(" \t") != etag:
        return None
    return parse_range(header, length)


async def _start(
    request: web.Request, headers: dict[str, str], length: int | None, byte_range: ByteRange | None
) -> web.StreamResponse:
    """The answer's status and headers, sent: a 206 for a range, else a 200."""
    response = web.StreamResponse(status=206 if byte_range else 200, headers=headers)
    if byte_range is not None and length is not None:
        response.headers["Content-Range"] = byte_range.content_range(length)
        response.content_length = byte_range.length
    elif length is not None:
        response.content_length = length
    await response.prepare(request)
    return response


async def _send_cached(
    request: web.Request, cached: CachedBlob, headers: dict[str, str]
) -> web.StreamResponse:
    byte_range = _range(request, headers["ETag"], cached.size)
    response = await _start(request, headers, cached.size, byte_range)
    start, count = (byte_range.start, byte_range.length) if byte_range else (0, cached.size)
    if request.method == "GET" and count:
        sent = await _send(request, response, Span(cached.file, start, count))
        request.app[METRICS].served_bytes.labels("cache").inc(sent)
    await response.write_eof()
    return response


async def _stream(
    request: web.Request, reader: BlobReader, length: int | None, headers: dict[str, str]
) -> web.StreamResponse:
    """A blob being downloaded, served from the growing file."""
    byte_range = _range(request, headers["ETag"], length)
    response = await _start(request, headers, length, byte_range)
    try:
        async with aclosing(reader.chunks(byte_range)) as chunks:
            served = request.app[METRICS].served_bytes.labels("upstream")
            async for piece in chunks:
                served.inc(await _send(request, response, piece))
    except RegistryError as error:
        # Headers are gone already: cutting the connection is the only way to say "failed".
        log.warning("cut %s %s mid-body: %s", request.method, request.path, error.message)
        if request.transport is not None:
            request.transport.close()
        return response
    await response.write_eof()
    return response


async def _send(request: web.Request, response: web.StreamResponse, piece: Span | bytes) -> int:
    if isinstance(piece, bytes):
        await response.write(piece)
        return len(piece)
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("the client went away")
    # Chunked answers need framing around the bytes, and TLS encrypts them in Python.
    if response.content_length is None or transport.get_extra_info("sslcontext") is not None:
        await _copy(response, piece)
        return piece.count
    sent = _sendfile_now(transport, piece)
    if sent < piece.count:
        rest = Span(piece.file, piece.offset + sent, piece.count - sent)
        try:  # from the page cache to the socket, no copy through Python
            await asyncio.get_running_loop().sendfile(
                transport, rest.file, rest.offset, rest.count, fallback=False
            )
        except (NotImplementedError, asyncio.SendfileNotAvailableError):  # before any byte
            await _copy(response, rest)
    return piece.count


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


async def _copy(response: web.StreamResponse, piece: Span) -> None:
    """Not asyncio's sendfile fallback: it seeks the file, whose offset all readers share."""
    fd, offset, end = piece.file.fileno(), piece.offset, piece.offset + piece.count
    while offset < end:
        data = os.pread(fd, min(COPY_CHUNK, end - offset), offset)
        if not data:
            raise OSError(f"{piece.file.name} is shorter than the bytes written to it")
        await response.write(data)
        offset += len(data)


async def tags(request: web.Request) -> web.Response:
    """The repository's tags in lexical order, paged by `n` and `last` by the mirror."""
    upstream, name = await _upstream(request)
    n = _page_size(request.query.get("n"))
    last = request.query.get("last")
    page = await request.app[MANIFESTS].tags(upstream, name, n, last)
    headers = {}
    if page.more and n is not None:
        headers["Link"] = _client_link(request, n, page.tags[-1])
    body = {"name": request.match_info["name"], "tags": list(page.tags)}
    return web.json_response(body, headers=headers)


def _page_size(text: str | None) -> int | None:
    if text is None:
        return None
    if not _DIGITS.fullmatch(text):
        raise PaginationInvalid(f"invalid n={text!r}: must be a non-negative number")
    return int(text.lstrip("0")[:_MAX_N_DIGITS] or "0")  # past any tag count: all of them


def _client_link(request: web.Request, n: int, last: str) -> str:
    """`Link: <…?n=&last=>; rel="next"` to the next page, on the path the client asked (its
    prefix, and its `ns`): following it reaches the same upstream through the mirror."""
    query = {"n": str(n), "last": last}
    if "ns" in request.query:
        query["ns"] = request.query["ns"]
    return f'<{URL.build(path=request.path, query=query)}>; rel="next"'


async def referrers(request: web.Request) -> web.Response:
    upstream, name = await _upstream(request)
    digest = parse_digest(request.match_info["digest"])
    artifact_type = request.query.get("artifactType")
    body = await request.app[MANIFESTS].referrers(upstream, name, digest, artifact_type)
    headers = {"Content-Type": OCI_INDEX}
    if artifact_type is not None:
        headers["OCI-Filters-Applied"] = "artifactType"
    return web.Response(body=body, headers=headers)


async def not_supported(request: web.Request) -> web.Response:
    if request.method in ("GET", "HEAD"):
        raise web.HTTPNotFound()
    raise Unsupported(f"{request.method} is not supported: this registry is a read-only mirror")
