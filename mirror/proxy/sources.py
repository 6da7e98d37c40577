"""Where a download reads a blob from: an object behind one interface, so that a new place
(the shared bucket, a peer replica) is a new class and the `Fetch` stays the same.

A source gives the blob's body from a byte offset (for resuming after a cut); the body
says where it really starts (a source may ignore the offset and start again from 0) and
the blob's whole length, when known.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

from mirror.errors import UpstreamCut
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

    def __init__(self, tier: Tier, size: int, upstream: Source) -> None:
        self.tier = tier
        self.size = size
        self.upstream = upstream
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
            yield _SharedBody(stream, self.size)
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
