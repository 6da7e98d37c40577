"""Talking to one upstream registry: requests, auth challenges, redirects, and the status table.

Every upstream answer that is not a success becomes one of our `RegistryError`s here, in
`_raise_for_status`, and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
from aiohttp.connector import Connection
from aiohttp.tracing import Trace
from multidict import CIMultiDict
from prometheus_client import Counter
from yarl import URL

from mirror.config import UpstreamConfig
from mirror.errors import (
    STALE_SERVABLE,
    BlobUnknown,
    Busy,
    Denied,
    ManifestUnknown,
    NameUnknown,
    RegistryError,
    TooManyRequests,
    Unauthorized,
    UpstreamCut,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from mirror.metrics import Metrics
from mirror.reference import Digest, parse_digest
from mirror.routing import forwarded
from mirror.upstream.auth import Authenticator, parse_challenge, read_at_most
from mirror.upstream.credentials import credential_source
from mirror.upstream.ratelimit import QuotaShare, RateLimit

log = logging.getLogger(__name__)

MAX_MANIFEST_SIZE = 4 * 1024 * 1024
MAX_LISTING_SIZE = 4 * 1024 * 1024
MAX_REDIRECTS = 5
# A blob's body is read at most this much at a time, also from the socket: asyncio's
# selector transport reads 256 KiB per call, so a MiB took four turns of the event loop,
# each with its recv, parse, write, hash and wake-ups.
CHUNK_SIZE = 1024 * 1024
RETRY_BACKOFF = 0.05  # seconds before the first retry; doubled for each one after
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_RETRIED_STATUSES = frozenset({500, 502, 503, 504})
_UNKNOWN = {"manifest": ManifestUnknown, "blob": BlobUnknown, "repository": NameUnknown}


class KeptAliveConnector(aiohttp.TCPConnector):
    """Keeps upstream connections alive between requests, but never hands out one on which
    the upstream sent anything after its last answer ended.

    aiohttp returns a connection to the pool the moment a body reaches its declared end,
    and parses whatever comes after it (in the same read, or later while the connection
    idles) as the answer to the next request sent on it: a tag would be recorded as
    pointing to a digest the upstream gave for another, a healthy blob would fail its
    digest. HTTP/1.1 has no way to tell such bytes from a real answer once a request is
    sent, so the connection is checked before it is used, and closed if it spoke.
    """

    async def connect(
        self,
        req: aiohttp.ClientRequest,
        traces: list[Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 - aiohttp's signature
    ) -> Connection:
        # Each refusal closes a pooled connection, and the pool holds at most `limit`.
        for _ in range(self.limit + 1):
            connection = await super().connect(req, traces, timeout)
            protocol = connection.protocol
            if protocol is None or not protocol.should_close:
                return connection
            log.debug("upstream %s sent bytes past an answer; connection closed", req.url.host)
            connection.close()
        raise aiohttp.ClientConnectionError(f"{req.url.host} sends answers before any request")


def upstream_session() -> aiohttp.ClientSession:
    """The session every upstream shares: bodies as sent, connections kept alive only
    while they carry nothing but the answers asked for. Bodies are asked for as they are
    (aiohttp would offer gzip): a digest is of the bytes themselves, which a compressing
    proxy in front of a registry would not send."""
    return aiohttp.ClientSession(
        connector=KeptAliveConnector(),
        auto_decompress=False,
        headers={"Accept-Encoding": "identity"},
    )


@dataclass(frozen=True)
class UpstreamManifest:
    """A manifest as the upstream sent it; `body` is None for a HEAD."""

    body: bytes | None
    media_type: str
    digest: Digest | None


@dataclass(frozen=True)
class UpstreamListing:
    """A tags/list or referrers answer, passed through with the headers that matter."""

    body: bytes
    content_type: str
    link: str | None


class UpstreamBlob:
    """An upstream blob body being received, in bounded chunks, from byte `start` on.

    `length` is the whole blob's, when the upstream declared it.
    """

    def __init__(self, response: aiohttp.ClientResponse, received: Counter, offset: int) -> None:
        self._response = response
        self._received = received
        self.start = 0
        self.length = response.content_length
        if response.status == 206:
            self.start, self.length = _content_range(response, offset)

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            with _socket_reads(self._response, CHUNK_SIZE):
                async for chunk in self._response.content.iter_chunked(CHUNK_SIZE):
                    self._received.inc(len(chunk))
                    yield chunk
        except TimeoutError as exc:
            raise UpstreamCut("upstream stopped sending the blob") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamCut(f"upstream connection failed mid-blob: {exc}") from exc


@contextlib.contextmanager
def _socket_reads(response: aiohttp.ClientResponse, size: int) -> Iterator[None]:
    """Meanwhile the response's connection reads its socket up to `size` bytes per call,
    where its transport says how much (`max_size`, 256 KiB, on asyncio's selector
    transports); others (TLS, uvloop) are left as they are. Only the size of each read
    changes: aiohttp's flow control still bounds what is buffered (`iter_chunked` raises
    it to twice the chunk)."""
    connection = response.connection
    transport = connection.transport if connection is not None else None
    default = getattr(transport, "max_size", None)
    if not isinstance(default, int) or default >= size:
        yield
        return
    setattr(transport, "max_size", size)  # noqa: B010 (not in Transport's declared type)
    try:
        yield
    finally:  # the connection may go back to the pool, for manifests: as it was
        setattr(transport, "max_size", default)  # noqa: B010


def _content_range(response: aiohttp.ClientResponse, offset: int) -> tuple[int, int | None]:
    """(first byte, whole length) of a 206 to `Range: bytes=<offset>-`."""
    unit, _, rest = response.headers.get("Content-Range", "").partition(" ")
    span, _, total = rest.partition("/")
    first, _, _ = span.partition("-")
    if unit != "bytes" or not first.isdigit() or int(first) != offset:
        raise UpstreamError(f"upstream answered a range from {offset} with {rest or 'nothing'}")
    return offset, int(total) if total.isdigit() else None


class Upstream:
    """One configured upstream registry, reached through the shared session."""

    def __init__(
        self,
        config: UpstreamConfig,
        session: aiohttp.ClientSession,
        metrics: Metrics | None = None,
        quota_share: QuotaShare | None = None,
    ) -> None:
        """`quota_share`: where a fleet's replicas keep the quota they saw (fleet mode)."""
        self.config = config
        self.name = config.name
        self.url = URL(config.url)
        self.session = session
        self.metrics = metrics or Metrics()
        self.metrics.add_upstream(config.name)
        self._received = self.metrics.upstream_bytes.labels(config.name)
        self.credentials = credential_source(config)
        timeouts = config.timeouts
        # Between reads; the wait for the answer's headers is bounded by first_byte.
        self.timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=timeouts.connect, sock_read=timeouts.idle
        )
        self.auth = Authenticator(
            config.name,
            self.url,
            self.credentials,
            session,
            config.allowed_realms,
            self.timeout,
        )
        self.ratelimit = RateLimit(config.name, config.ratelimit_reserve)
        self.quota_share = quota_share
        self._publishing: set[asyncio.Task[None]] = set()
        self.failing = False
        self.last_error: tuple[float, str] | None = None  # (Unix time, message), for /status
        self._slots = asyncio.Semaphore(config.max_fetches)
        self._queued = 0

    async def close(self) -> None:
        for task in list(self._publishing):
            task.cancel()
        await asyncio.gather(*self._publishing, return_exceptions=True)
        if self.credentials is not None:
            await self.credentials.close()

    @property
    def counts_pulls(self) -> bool:
        """Whether a manifest GET spends a pull of a quota (Docker Hub's, or one like it)."""
        return self.config.docker_hub or self.ratelimit.limit is not None

    async def get_manifest(
        self, repository: str, reference: str, accept: tuple[str, ...]
    ) -> UpstreamManifest:
        """A counted pull on Docker Hub: refused here while the quota is at its reserve.

        A manifest over 4 MiB is the upstream's fault, not the client's: an UpstreamError.
        """
        await self._check_quota(repository, reference, accept)
        path = f"/v2/{repository}/manifests/{reference}"
        too_large = f"upstream {self.name} sent a manifest over {MAX_MANIFEST_SIZE} bytes"
        async with self._request("GET", path, repository, "manifest", _accept(accept)) as resp:
            if (resp.content_length or 0) > MAX_MANIFEST_SIZE:
                raise UpstreamError(too_large)
            body = await read_at_most(resp.content, MAX_MANIFEST_SIZE)
            self._received.inc(len(body))
            if len(body) > MAX_MANIFEST_SIZE:
                raise UpstreamError(too_large)
            return UpstreamManifest(body, _media_type(resp), _content_digest(resp))

    async def head_manifest(
        self, repository: str, reference: str, accept: tuple[str, ...]
    ) -> UpstreamManifest:
        path = f"/v2/{repository}/manifests/{reference}"
        async with self._request("HEAD", path, repository, "manifest", _accept(accept)) as resp:
            return UpstreamManifest(None, _media_type(resp), _content_digest(resp))

    async def _check_quota(self, repository: str, reference: str, accept: tuple[str, ...]) -> None:
        if self.quota_share is not None:
            seen = await self.quota_share.quota(self.name)
            if seen is not None:
                self.ratelimit.adopt(seen)
        if self.ratelimit.worth_probing:
            # A HEAD costs no pull and brings fresh quota headers.
            with contextlib.suppress(RegistryError):
                await self.head_manifest(repository, reference, accept)
        if self.ratelimit.blocked:
            raise TooManyRequests(
                f"upstream {self.name}: pull quota exhausted"
                f" ({self.ratelimit.remaining} left, reserve {self.ratelimit.reserve});"
                " only cached images are served",
                str(self.ratelimit.retry_after),
            )

    def _publish_quota(self) -> None:
        """What this replica just saw of the quota, for the others (in the background: the
        answer does not wait for it)."""
        rate = self.ratelimit
        if self.quota_share is None:
            return
        task = asyncio.create_task(
            self.quota_share.set_quota(
                self.name, rate.remaining, rate.limit, rate.window, rate.blocked_until()
            )
        )
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    async def head_blob(self, repository: str, digest: Digest) -> int | None:
        """The blob's length, as the upstream declares it."""
        path = f"/v2/{repository}/blobs/{digest}"
        async with self._request("HEAD", path, repository, "blob") as resp:
            return resp.content_length

    @asynccontextmanager
    async def blob(
        self, repository: str, digest: Digest, offset: int = 0
    ) -> AsyncIterator[UpstreamBlob]:
        """The blob's body, from `offset` when the upstream honours a Range (see `start`)."""
        path = f"/v2/{repository}/blobs/{digest}"
        headers = {"Range": f"bytes={offset}-"} if offset else None
        # A resumption waits its turn, but is never refused: its clients have headers.
        request = self._request("GET", path, repository, "blob", headers, queue_bound=not offset)
        async with request as resp:
            yield UpstreamBlob(resp, self._received, offset)

    async def listing(
        self, repository: str, path: str, query: Mapping[str, str]
    ) -> UpstreamListing:
        """tags/list or referrers: small JSON answers passed through."""
        kind = "repository" if path.endswith("tags/list") else "manifest"
        async with self._request("GET", path, repository, kind, params=query) as resp:
            body = await read_at_most(resp.content, MAX_LISTING_SIZE)
            self._received.inc(len(body))
            if len(body) > MAX_LISTING_SIZE:
                raise UpstreamError(f"upstream {self.name} sent a listing over 4 MiB")
            content_type = resp.headers.get("Content-Type", "application/json")
            return UpstreamListing(body, content_type, resp.headers.get("Link"))

    @asynccontextmanager
    async def _request(
        self,
        method: str,
        path: str,
        repository: str,
        kind: str,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        queue_bound: bool = True,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Send, answering one auth challenge and retrying server errors; yields only
        successful responses. It holds one of the upstream's fetch slots throughout.

        `path` is `/v2/<repository>/...`."""
        path, repository, query = self._addressed(path, repository, params or {})
        url = self.url.with_path(path).with_query(query)
        async with self._slot(queue_bound):
            try:
                response = await self._send_retrying(method, url, repository, headers)
                try:
                    if kind == "manifest" or response.status == 429:
                        seen_before = self.ratelimit.observed_wall
                        self.ratelimit.observe(response.headers, response.status)
                        if self.ratelimit.observed_wall != seen_before:
                            self._publish_quota()
                    self._raise_for_status(response, kind, f"{method} {path}")
                    self._answering()
                    yield response
                finally:
                    _let_go(response)
            except STALE_SERVABLE as error:
                self._failing(error)
                raise
            except RegistryError:
                raise
            except TimeoutError as exc:
                raise self._failing(
                    UpstreamTimeout(f"upstream {self.name} did not answer {method} {path} in time")
                ) from exc
            except aiohttp.ClientConnectorError as exc:
                raise self._failing(
                    UpstreamUnavailable(
                        f"upstream {self.name} ({self.url.host}) is unreachable: {exc.os_error}"
                    )
                ) from exc
            except aiohttp.ClientError as exc:
                raise self._failing(
                    UpstreamUnavailable(
                        f"upstream {self.name} failed {method} {path}: {_described(exc)}"
                    )
                ) from exc

    def _addressed(
        self, path: str, repository: str, params: Mapping[str, str]
    ) -> tuple[str, str, Mapping[str, str]]:
        """Path, repository and query as this upstream is asked: another mirror learns the
        registry from `ns`, and knows the repository by the rest of its name."""
        host, name = forwarded(repository) if self.config.type == "mirror" else (None, repository)
        if host is None:
            return path, repository, params
        rest = path.removeprefix(f"/v2/{repository}/")
        return f"/v2/{name}/{rest}", name, {**params, "ns": host}

    @asynccontextmanager
    async def _slot(self, queue_bound: bool) -> AsyncIterator[None]:
        """One of `max_fetches` at a time; past `max_queued` waiting, Busy (503)."""
        if queue_bound and self._slots.locked() and self._queued >= self.config.max_queued:
            raise Busy(
                f"upstream {self.name} has {self.config.max_fetches} requests under way and"
                f" {self._queued} waiting; try again shortly"
            )
        self._queued += 1
        try:
            await self._slots.acquire()
        finally:
            self._queued -= 1
        try:
            yield
        finally:
            self._slots.release()

    async def _send_retrying(
        self, method: str, url: URL, repository: str, headers: Mapping[str, str] | None
    ) -> aiohttp.ClientResponse:
        """Every request we make is a GET or HEAD: idempotent, so a 5xx or a failed
        connection is tried again, `retries` times, after a growing pause."""
        for attempt in range(self.config.retries + 1):
            last = attempt == self.config.retries
            try:
                response = await self._send(method, url, repository, headers)
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError):
                if last:
                    raise
            else:
                if response.status not in _RETRIED_STATUSES or last:
                    return response
                _let_go(response)
            await asyncio.sleep(RETRY_BACKOFF * 2**attempt * random.uniform(1, 1.5))
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _send(
        self, method: str, url: URL, repository: str, headers: Mapping[str, str] | None
    ) -> aiohttp.ClientResponse:
        """One request, answering one auth challenge."""
        scope = f"repository:{repository}:pull"
        authorization = await self.auth.header(scope)
        response = await self._follow(method, url, headers, authorization)
        if response.status == 401:
            challenge = parse_challenge(response.headers.get("WWW-Authenticate"))
            retry = await self.auth.answer(challenge, scope, authorization) if challenge else None
            if retry is not None:
                _let_go(response)
                response = await self._follow(method, url, headers, retry)
        return response

    def _failing(self, error: RegistryError) -> RegistryError:
        """Log an outage once, when it begins, however many requests meet it."""
        self.last_error = (time.time(), error.message)
        if not self.failing:
            self.failing = True
            log.warning(
                "upstream %s is failing: %s (logged once, until it answers again)",
                self.name,
                error.message,
            )
        return error

    def _answering(self) -> None:
        if self.failing:
            self.failing = False
            log.info("upstream %s answers again", self.name)

    async def _follow(
        self,
        method: str,
        url: URL,
        headers: Mapping[str, str] | None,
        authorization: str | None,
    ) -> aiohttp.ClientResponse:
        """Follow redirects by hand, so `Authorization` never leaves the upstream's host."""
        send = CIMultiDict(headers or {})
        if authorization:
            send["Authorization"] = authorization
        for _ in range(MAX_REDIRECTS + 1):
            try:
                async with asyncio.timeout(self.config.timeouts.first_byte):
                    response = await self.session.request(
                        method, url, headers=send, allow_redirects=False, timeout=self.timeout
                    )
            except (TimeoutError, aiohttp.ClientError):
                self.metrics.upstream_requests.labels(self.name, method, "error").inc()
                raise
            self.metrics.upstream_requests.labels(self.name, method, str(response.status)).inc()
            location = response.headers.get("Location")
            if response.status not in _REDIRECTS or location is None:
                return response
            _let_go(response)
            target = url.join(URL(location))
            if target.scheme not in ("http", "https"):
                raise UpstreamError(f"upstream {self.name} redirected to a non-HTTP URL")
            if target.origin() != url.origin():
                send.pop("Authorization", None)
            url = target
        raise UpstreamError(f"upstream {self.name} redirected more than {MAX_REDIRECTS} times")

    def _raise_for_status(self, response: aiohttp.ClientResponse, kind: str, what: str) -> None:
        """The one table from upstream statuses to our errors."""
        status, name = response.status, self.name
        if 200 <= status < 300:
            return
        if status == 404:
            raise _UNKNOWN[kind](f"{kind} unknown to upstream {name}", {"request": what})
        if status == 401:
            raise Unauthorized(f"upstream {name} requires authentication that failed")
        if status == 403:
            raise Denied(f"upstream {name} denied access")
        if status == 429:
            raise TooManyRequests(
                f"upstream {name} is rate limiting pulls", str(self.ratelimit.retry_after)
            )
        raise UpstreamError(f"upstream {name} answered {status} to {what}")


def _described(exc: aiohttp.ClientError) -> str:
    """The failure, without the request: the repr of aiohttp's errors holds its headers
    (`Authorization` among them), and a parse error the bytes that did not parse."""
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"{type(exc).__name__}: an answer that is not HTTP ({exc.message.partition(':')[0]})"
    return f"{type(exc).__name__}: {exc}"


def _let_go(response: aiohttp.ClientResponse) -> None:
    """Back to the pool only after its body was read to the declared end (what came after
    that, `KeptAliveConnector` checks); a connection left mid-body, cut or abandoned on an
    error, is closed: the rest of that body would be taken for the next answer."""
    if response.content.is_eof():
        response.release()
    else:
        response.close()


def _accept(accept: tuple[str, ...]) -> dict[str, str]:
    return {"Accept": ", ".join(accept)} if accept else {}


def _media_type(response: aiohttp.ClientResponse) -> str:
    return response.headers.get("Content-Type", "").split(";", 1)[0].strip()


def _content_digest(response: aiohttp.ClientResponse) -> Digest | None:
    value = response.headers.get("Docker-Content-Digest")
    if value is None:
        return None
    try:
        return parse_digest(value)
    except RegistryError:
        return None
