"""Where a download reads a blob from: an object behind one interface, so that a new place
(the shared bucket, a peer replica) is a new class and the `Fetch` stays the same.

A source gives the blob's body from a byte offset (for resuming after a cut); the body
says where it really starts (a source may ignore the offset and start again from 0) and
the blob's whole length, when known.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

import aiohttp
from prometheus_client import Counter

from mirror.config import Timeouts
from mirror.errors import (
    PeerRefused,
    UpstreamCut,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from mirror.reference import Digest
from mirror.shared.bucket import BucketUnavailable, ObjectMissing
from mirror.shared.tier import Stream, Tier, TierUnavailable
from mirror.upstream.client import Upstream

log = logging.getLogger(__name__)


class Body(Protocol):
    start: int  # the blob's byte the first chunk begins at
    length: int | None  # the whole blob's, when declared

    def chunks(self) -> AsyncIterator[bytes]:
        """The bytes as they arrive; raises UpstreamCut when the connection breaks."""
        ...


class Source(Protocol):
    name: str  # in logs and metrics
    retries: int  # cuts resumed at most, per download
    patience: float  # seconds a pass-through waits for its slowest reader
    shared: bool  # the shared tier's bytes: nothing to keep there again

    def body(self, digest: Digest, offset: int) -> AbstractAsyncContextManager[Body]: ...


class UpstreamSource:
    """The blob from its upstream registry, under the repository the client asked for."""

    def __init__(self, upstream: Upstream, repository: str) -> None:
        self.upstream = upstream
        self.repository = repository
        self.name = upstream.name
        self.retries = upstream.config.retries
        self.patience = upstream.config.timeouts.idle
        self.shared = False

    def body(self, digest: Digest, offset: int) -> AbstractAsyncContextManager[Body]:
        return self.upstream.blob(self.repository, digest, offset)


class SharedSource:
    """The blob from the shared tier's bucket, where another replica kept it verified (it
    is verified again on the way: bit rot and tampering happen). When the bucket cannot
    send it (unreachable, or the object gone), from the upstream instead, also to resume
    a cut: the same bytes, verified alike, kept in the shared tier again afterwards."""

    name = "shared"

    def __init__(self, tier: Tier, size: int, upstream: Source, counter: Counter) -> None:
        """`counter`: of the bytes read from the bucket."""
        self.tier = tier
        self.size = size
        self.upstream = upstream
        self.counter = counter
        self.retries = upstream.retries
        self.patience = upstream.patience
        self.shared = True  # until the upstream sends any of it

    @asynccontextmanager
    async def body(self, digest: Digest, offset: int) -> AsyncIterator[Body]:
        stream = await self._stream(digest, offset) if self.shared else None
        if stream is None:
            self.shared = False
            async with self.upstream.body(digest, offset) as body:
                yield body
            return
        try:
            yield Counted(_SharedBody(stream, self.size), self.counter)
        finally:
            stream.close()

    async def _stream(self, digest: Digest, offset: int) -> Stream | None:
        try:
            return await self.tier.read(digest, offset)
        except TierUnavailable as exc:
            log.info("%s from %s instead of the shared tier: %s", digest, self.upstream.name, exc)
        except ObjectMissing:
            await self.tier.discard(digest, "its object is missing from the bucket")
        return None


class _SharedBody:
    def __init__(self, body: Stream, size: int) -> None:
        self.body = body
        self.start = body.start
        self.length: int | None = size

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.body.chunks():
                yield chunk
        except BucketUnavailable as exc:
            raise UpstreamCut(f"the shared bucket's answer broke off: {exc}") from exc


class Counted:
    """A body whose bytes are counted as they arrive (from the bucket, from a peer)."""

    def __init__(self, body: Body, counter: Counter) -> None:
        self.body = body
        self.start = body.start
        self.length = body.length
        self.counter = counter

    async def chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self.body.chunks():
            self.counter.inc(len(chunk))
            yield chunk


PEER_PATH = "/_mirror/peer/blobs/{digest}"  # a replica's peer route (web/peer.py)
PEER_CHUNK = 256 * 1024  # bytes taken from a peer's answer at a time
PEER_RETRIES = 2  # cuts of a peer's answer resumed from it, per download


class PeerSource:
    """The blob from another replica of the fleet, the one downloading it for the fleet:
    its growing file streamed as it arrives, through that replica's peer route with the
    fleet's secret. The bytes are verified here again, as any source's.

    A peer that has neither the blob nor its download, refuses the secret, or cannot be
    reached raises `UpstreamError` on opening (the caller then reads elsewhere); an answer
    that breaks off raises `UpstreamCut`, to be resumed with a Range."""

    name = "peer"

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        secret: str,
        timeouts: Timeouts,
        retries: int = PEER_RETRIES,
    ) -> None:
        """`url`: the peer's advertised URL; `timeouts` bound connecting, its answer's
        headers (which wait for its own source to answer) and each read."""
        self.session = session
        self.url = url.rstrip("/")
        self.secret = secret
        self.first_byte = timeouts.first_byte
        self.timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=timeouts.connect, sock_read=timeouts.idle
        )
        self.retries = retries
        self.patience = timeouts.idle
        self.shared = False

    @asynccontextmanager
    async def body(self, digest: Digest, offset: int) -> AsyncIterator[Body]:
        response = await self._get(digest, offset)
        try:
            yield _PeerBody(self._checked(response, digest), offset)
        finally:
            # Kept alive only once read to its end: the rest of a body left midway would
            # be taken for the next answer on the connection.
            if response.content.is_eof():
                response.release()
            else:
                response.close()

    async def _get(self, digest: Digest, offset: int) -> aiohttp.ClientResponse:
        url = self.url + PEER_PATH.format(digest=digest)
        headers = {"Authorization": f"Bearer {self.secret}"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            async with asyncio.timeout(self.first_byte):
                return await self.session.get(
                    url, headers=headers, allow_redirects=False, timeout=self.timeout
                )
        except TimeoutError as exc:
            raise UpstreamTimeout(f"peer {self.url} did not answer for {digest} in time") from exc
        except aiohttp.ClientError as exc:
            # Not the exception's repr: it holds the request's headers, the secret among them.
            raise UpstreamUnavailable(
                f"peer {self.url} cannot be reached: {type(exc).__name__}: {exc}"
            ) from exc

    def _checked(self, response: aiohttp.ClientResponse, digest: Digest) -> aiohttp.ClientResponse:
        status = response.status
        if status in (200, 206):
            return response
        response.close()
        if status == 404:
            raise UpstreamError(f"peer {self.url} has {digest} neither cached nor downloading")
        if status == 401:
            raise PeerRefused(f"peer {self.url} refused the fleet's secret")
        raise UpstreamError(f"peer {self.url} answered {status} for {digest}")


class _PeerBody:
    def __init__(self, response: aiohttp.ClientResponse, offset: int) -> None:
        self.response = response
        self.start = 0
        self.length: int | None = response.content_length
        if response.status == 206:
            self.start, self.length = _placed(response.headers.get("Content-Range", ""), offset)

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.response.content.iter_chunked(PEER_CHUNK):
                yield chunk
        except TimeoutError as exc:
            raise UpstreamCut("the peer stopped sending the blob") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamCut(f"the peer's answer broke off: {type(exc).__name__}") from exc


def _placed(content_range: str, offset: int) -> tuple[int, int]:
    """(first byte, whole length) of a peer's 206 to `Range: bytes=<offset>-`."""
    unit, _, rest = content_range.partition(" ")
    span, _, total = rest.partition("/")
    first, _, _ = span.partition("-")
    if unit != "bytes" or first != str(offset) or not total.isdigit():
        raise UpstreamError(f"a peer answered a range from {offset} with {rest or 'nothing'}")
    return offset, int(total)
