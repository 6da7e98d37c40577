"""Pull-through for blobs: local first, else one shared download per digest.

A download (fetch.py) is owned by `BlobProxy`, not by the request that started it: a task
reads the blob from its source (sources.py: the upstream today) into the blob's temp file
while hashing it, and every request for that digest streams from the growing file; the
blob is committed into the cache once verified. A source's connection that breaks
mid-body is resumed with a Range request (or, when the source ignores the Range, received
again from the start with the bytes already written skipped), `retries` times at most.

Space in the budget is reserved before a byte is written: the declared length, or, for a
blob of undeclared length, 1 MiB at a time as it arrives (concurrent downloads must not
crowd each other out). A blob that does not fit (at its start, when the reservation
cannot grow, or when the disk fills up) passes through: readers get the rest from a
bounded memory window, and nothing is cached.

A blob fetched through an `authenticated` upstream is private (storage/cache.py):
a request routed to a public upstream does not see it in the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import BinaryIO

from mirror.errors import RegistryError, UpstreamCut, UpstreamError
from mirror.metrics import Metrics
from mirror.proxy.fetch import BlobReader, Fetch
from mirror.proxy.fleet import FleetSource
from mirror.proxy.sinks import Span
from mirror.proxy.sources import Body, SharedSource, Source, UpstreamSource
from mirror.reference import Digest
from mirror.routing import Route
from mirror.shared.tier import Kept, Tier, TierUnavailable, Unshared, blob_key
from mirror.storage.blobs import DigestMismatch
from mirror.storage.budget import Budget
from mirror.storage.cache import Cache
from mirror.upstream.client import Upstream

log = logging.getLogger(__name__)

GROWTH_STEP = 1024 * 1024  # reserved at a time for a blob of undeclared length
BLOB_TYPE = "application/octet-stream"  # a blob's bytes have no type of their own
EVERY_ACCESS = "authenticated"  # the access that sees private blobs too


@dataclass(frozen=True)
class CachedBlob:
    """A hit: a complete, verified blob on disk, open and held from eviction until closed
    (it is a context manager)."""

    file: BinaryIO
    size: int
    result: str = "hit"

    def __enter__(self) -> CachedBlob:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.file.close()


@dataclass(frozen=True)
class Download:
    """A miss: the blob's shared download, read through a reader of its own; `size` as the
    source declared it (None: undeclared)."""

    reader: BlobReader
    size: int | None
    result: str = "miss"


@dataclass(frozen=True)
class BlobSize:
    """A miss answered without its bytes (a HEAD): the size the upstream declares, or
    the shared tier's."""

    size: int | None
    result: str = "miss"


@dataclass(frozen=True)
class Redirect:
    """A hit in the shared tier answered by the bucket itself: a presigned URL of it."""

    url: str
    result: str = "shared"


Blob = CachedBlob | Download | BlobSize | Redirect


class BlobProxy:
    def __init__(
        self,
        cache: Cache,
        budget: Budget,
        upstreams: Mapping[str, Upstream],
        metrics: Metrics | None = None,
        tier: Tier | None = None,
        peers: Callable[[str], Source] | None = None,
    ) -> None:
        """`upstreams`: the clients by upstream name, for misses (none in a worker);
        `tier`: what other replicas have kept, asked before the upstream; `peers(url)`: a
        source reading from the replica at `url`, with which this replica follows the one
        that fetches a blob for the fleet (none: it fetches alone)."""
        self.cache = cache
        self.budget = budget
        self.upstreams = upstreams
        self.tier = tier or Unshared()
        self.peers = peers
        self.metrics = metrics or Metrics()
        self._fetches: dict[tuple[str, Digest], Fetch] = {}  # by source name and digest
        self._tasks: set[asyncio.Task[None]] = set()
        self._disk_full = False  # logged once, until a blob is stored again

    def local(self, access: str, digest: Digest) -> CachedBlob | None:
        """The cached blob, open, recording the use; None on a miss (or a private blob
        asked for through a public route)."""
        opened = self.cache.open_blob(digest, access)
        if opened is None:
            return None
        self.tier.used(digest)
        return CachedBlob(*opened)

    @asynccontextmanager
    async def answer(self, route: Route, digest: Digest, *, body: bool) -> AsyncIterator[Blob]:
        """What one request gets, held until the answer is sent: the cached blob, or on a
        miss its shared download (`body`) or only its size (a HEAD: nothing downloaded)."""
        cached = self.local(route.upstream.access, digest)
        if cached is not None:
            with cached:
                yield cached
            return
        kept = await self.tier.find(digest, route.upstream.access)
        # Only a GET: a URL presigned for GET does not answer a HEAD.
        redirect = await self._presigned(digest) if kept and body and self.tier.redirect else None
        if redirect is not None:
            yield Redirect(redirect)
        elif not body:
            size = kept.size if kept else await self._size(route, digest)
            yield BlobSize(size, "shared" if kept else "miss")
        else:
            async with self.join(route, digest, kept) as reader:
                size = await reader.fetch.wait_started()
                yield Download(reader, size, "shared" if kept else "miss")

    @asynccontextmanager
    async def for_peer(self, digest: Digest) -> AsyncIterator[CachedBlob | Download | None]:
        """What another replica of the fleet gets, held until the answer is sent: the
        cached blob, whatever its access (replicas are trusted alike), or a reader of its
        download under way, from whatever source; None when neither is here. It never
        starts a download: the replica asking would have started its own."""
        cached = self.local(EVERY_ACCESS, digest)
        if cached is not None:
            with cached:
                yield cached
            return
        fetch = self._running(digest)
        if fetch is None:
            yield None
            return
        async with fetch.open_reader() as reader:
            yield Download(reader, await fetch.wait_started())

    def _running(self, digest: Digest) -> Fetch | None:
        """The download of `digest` under way, from any source (only one, nearly always)."""
        return next((f for (_, d), f in self._fetches.items() if d == digest), None)

    async def _presigned(self, digest: Digest) -> str | None:
        try:
            return await self.tier.presigned(digest)
        except TierUnavailable:
            return None

    async def _size(self, route: Route, digest: Digest) -> int | None:
        """For an answer without a body: the size from a download under way, or the
        upstream."""
        fetch = self._fetches.get((route.upstream.name, digest))
        if fetch is not None:
            return await fetch.wait_started()
        return await self.upstreams[route.upstream.name].head_blob(route.repository, digest)

    def join(self, route: Route, digest: Digest, kept: Kept | None) -> BlobReader:
        """A reader of the download of `digest` under way, or of a new one: from the shared
        tier when it has the blob (`kept`), else from the route's upstream."""
        source: Source = UpstreamSource(self.upstreams[route.upstream.name], route.repository)
        if kept is not None:
            source = SharedSource(self.tier, kept.size, source, self.metrics.shared_bytes)
        elif self.peers is not None:  # a fleet: one replica fetches, the others follow it
            access = route.upstream.access
            source = FleetSource(self.tier, source, self.peers, access, self.metrics)
        return self.download(source, digest, private=route.upstream.access == "authenticated")

    def download(self, source: Source, digest: Digest, private: bool) -> BlobReader:
        """A reader of the download of `digest` from `source` under way, or of a new one.

        One per source and digest: a download failing on one upstream never cuts
        another's clients."""
        key = (source.name, digest)
        fetch = self._fetches.get(key)
        if fetch is not None:
            self.metrics.fetch_joins.inc()
        else:
            fetch = Fetch(self.cache.writer(digest))
            self._fetches[key] = fetch
            task = asyncio.create_task(self._download(key, fetch, source, private))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return fetch.open_reader()

    async def prefetch(self, route: Route, digest: Digest) -> int | None:
        """Cache `digest` before any client asks: 0 when it is cached already, else the
        bytes fetched, through the download clients share (one asking meanwhile joins it).

        None when the blob does not fit the budget: passing through, it would be cached
        nowhere, so this reader leaves it (to whichever clients read it, if any)."""
        cached = self.local(route.upstream.access, digest)
        if cached is not None:
            cached.file.close()
            return 0
        received = 0
        kept = await self.tier.find(digest, route.upstream.access)
        async with self.join(route, digest, kept) as reader:
            await reader.fetch.wait_started()
            async with contextlib.aclosing(reader.chunks(None)) as chunks:
                async for piece in chunks:
                    if not reader.fetch.sink.keeps:  # passing through: cached nowhere
                        return None
                    received += piece.count if isinstance(piece, Span) else len(piece)
            await reader.fetch.wait_done()  # committed and indexed, not only verified
        return received

    async def idle(self) -> None:
        """Until no download is running: each blob fetched is cached (or failed)."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    async def close(self) -> None:
        """Stop downloads still running (at shutdown)."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _download(
        self, key: tuple[str, Digest], fetch: Fetch, source: Source, private: bool
    ) -> None:
        error: RegistryError | None = None
        sharing = False  # the shared tier keeps the blob from here: it ends any lease
        self.metrics.fetches_in_flight.inc()
        try:
            await self._receive(key, fetch, source)
            await fetch.check()
            if fetch.sink.keeps:
                sharing = await self._keep(fetch, private, share=not source.shared)
        except RegistryError as exc:
            error = exc
            if isinstance(exc, DigestMismatch):
                self.metrics.digest_mismatches.labels(source.name).inc()
                log.warning("%s from %s: %s", fetch.digest, source.name, exc.message)
                if source.shared:
                    await self.tier.discard(fetch.digest, "its bytes do not match the digest")
            else:  # an outage is logged once, by the upstream client
                log.debug("download of %s from %s failed: %s", fetch.digest, source.name, exc)
        except asyncio.CancelledError:
            error = UpstreamError("the mirror is shutting down")
            raise
        except Exception as exc:
            log.exception("download of %s from %s failed", fetch.digest, source.name)
            error = UpstreamError(f"download failed: {type(exc).__name__}")  # the log has the rest
        finally:
            # Readers are released first: nothing after this may leave them waiting.
            self._forget(key, fetch)
            await asyncio.shield(fetch.finish(error))
            fetch.writer.close()
            self.budget.release(fetch.reserved)
            self.metrics.fetches_in_flight.dec()
            if not sharing:  # a lease this replica took for the fleet ends unfulfilled
                await self.tier.release(blob_key(fetch.digest))

    def _forget(self, key: tuple[str, Digest], fetch: Fetch) -> None:
        """No new reader may join this download (it ended, or passes through)."""
        if self._fetches.get(key) is fetch:
            del self._fetches[key]

    async def _keep(self, fetch: Fetch, private: bool, share: bool) -> bool:
        """Commit the verified file, and (`share`) keep it in the shared tier from there. A
        failure to store it leaves the readers' answers whole: the blob was served, only not
        cached."""
        if not await self.cache.commit_file(fetch.writer, private=private):
            return False
        self._disk_full = False
        if share:
            path, size = self.cache.path(fetch.digest), fetch.written
            self.tier.keep_file(fetch.digest, path, size, BLOB_TYPE, private)
        return share

    async def _receive(self, key: tuple[str, Digest], fetch: Fetch, source: Source) -> None:
        """The whole body into `fetch`, resuming after a cut `retries` times at most."""
        for attempt in range(source.retries + 1):
            try:
                async with source.body(fetch.digest, fetch.written) as body:
                    await self._begin(key, fetch, source, body)
                    skip = fetch.written - body.start  # sent again by a restart from 0
                    async for chunk in body.chunks():
                        if skip:
                            dropped = min(skip, len(chunk))
                            chunk, skip = chunk[dropped:], skip - dropped
                        if chunk:
                            await self._take(key, fetch, source, chunk)
                return
            except UpstreamCut as cut:
                if attempt == source.retries or not fetch.started:
                    raise
                self.metrics.upstream_resumes.labels(source.name).inc()
                log.info(
                    "resuming %s from %s at byte %d: %s",
                    fetch.digest,
                    source.name,
                    fetch.written,
                    cut.message,
                )

    async def _begin(
        self, key: tuple[str, Digest], fetch: Fetch, source: Source, body: Body
    ) -> None:
        if fetch.started:  # a resumption: it must be the same blob
            if None not in (body.length, fetch.length) and body.length != fetch.length:
                raise UpstreamError(
                    f"{source.name} now says {fetch.digest} has {body.length} bytes,"
                    f" not {fetch.length}"
                )
            return
        if body.length is not None:  # else reserved step by step as the bytes come
            await self._reserve(key, fetch, body.length)
        await fetch.begin(body.length)

    async def _take(
        self, key: tuple[str, Digest], fetch: Fetch, source: Source, chunk: bytes
    ) -> None:
        await fetch.make_room(source.patience)
        if not fetch.sink.keeps and not fetch.readers:
            raise UpstreamError("every client of an uncached download went away")
        if fetch.length is not None and fetch.written + len(chunk) > fetch.length:
            raise UpstreamError(
                f"{source.name} sent more than the {fetch.length} bytes it declared"
            )
        if fetch.sink.keeps and fetch.written + len(chunk) > fetch.reserved:
            # Undeclared length: a little more (not much: concurrent downloads must not
            # crowd each other out), or pass through.
            await self._reserve(key, fetch, max(len(chunk), GROWTH_STEP))
        if await fetch.append(chunk):
            self._forget(key, fetch)
            self.metrics.disk_full.inc()
            if not self._disk_full:
                self._disk_full = True
                log.warning(
                    "disk full writing %s: it and any other blob that meets a full disk are"
                    " served without caching (logged once, until a blob is stored again)",
                    fetch.digest,
                )

    async def _reserve(self, key: tuple[str, Digest], fetch: Fetch, size: int) -> None:
        if await self.budget.reserve(size):
            fetch.reserved += size
            return
        self.budget.passed_through(fetch.digest, fetch.length)
        self._forget(key, fetch)
        fetch.pass_through()
