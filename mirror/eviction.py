"""Keeping the cache inside its disk budget: space reserved before downloads, LRU eviction.

What the cache holds on disk is counted as: the blobs in the index (exact totals kept by
SQLite triggers), plus the space reserved for downloads and manifest writes under way,
plus the index's own files. A download reserves its declared length before writing a
byte, so concurrent downloads cannot overshoot the budget together; when even eviction
cannot make room, the blob is served without being cached.

The evictor runs as a background task, woken when the cache crosses the high watermark
and once a minute (for `max_age`). It walks blobs least recently used first (one indexed
query per batch), deletes the file and then the row, and stops at the low watermark. It
skips blobs that some process holds open (a request reading, a download writing: see
`BlobStore.evict`) and the content of pinned images.

A pass that fails (the index locked by another process past its retries, a disk error)
is logged, once until a pass succeeds again, and ends there: it never fails the request
that needed room, which then finds none and is served uncached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass

from mirror.activity import Activity
from mirror.config import Config
from mirror.metrics import Metrics
from mirror.reference import Digest, parse_digest
from mirror.storage.blobs import BlobStore
from mirror.storage.images import Skipped, content_of
from mirror.storage.index import Index
from mirror.upstream.routing import Router

log = logging.getLogger(__name__)

PASS_INTERVAL = 60.0  # a pass at least this often, for max_age
BATCH = 512


@dataclass(frozen=True)
class Evicted:
    blobs: int
    bytes: int
    used: int  # bytes counted against the budget after the pass
    failure: str | None = None  # why the pass failed; then the counts are not known


class Evictor:
    def __init__(
        self,
        config: Config,
        store: BlobStore,
        index: Index,
        metrics: Metrics | None = None,
        activity: Activity | None = None,
    ) -> None:
        self.storage = config.storage
        self.metrics = metrics or Metrics()
        self.activity = activity or Activity()  # the recent evictions, for the status page
        self.pins = config.pins
        self.router = Router(config.upstreams)
        self.store = store
        self.index = index
        self.reserved = 0
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._failing = False  # the last pass failed (and that was logged)
        self._skipped = Skipped()  # digests the pins name that no walk can read

    @property
    def high(self) -> int:
        return int(self.storage.max_size * self.storage.high_watermark)

    @property
    def low(self) -> int:
        return int(self.storage.max_size * self.storage.low_watermark)

    async def used(self) -> int:
        """Bytes counted against the budget now."""
        stored = (await self.index.usage()).bytes
        return stored + self.reserved + self.index.file_bytes()

    async def reserve(self, size: int) -> bool:
        """Room for `size` more bytes, evicting if need be; False when there is none."""
        if size > self.storage.max_size - self.index.file_bytes():
            return False  # larger than all the budget could ever hold: evict nothing for it
        async with self._lock:
            if await self.used() + size > self.storage.max_size:
                await self._evict(max(min(self.low, self.storage.max_size - size), 0))
                if await self.used() + size > self.storage.max_size:
                    return False
            self.reserved += size
            return True

    def release(self, size: int) -> None:
        """A reservation is over: its bytes were committed (now in the index) or dropped."""
        self.reserved -= size
        self._wake.set()

    def passed_through(self, digest: Digest, size: int | None) -> None:
        self.metrics.uncached_passthrough.inc()
        log.warning(
            "no room in the %d-byte cache budget for %s (%s bytes): served without caching",
            self.storage.max_size,
            digest,
            size,
        )

    async def run(self) -> None:
        """The background task: a pass when woken and over the high watermark, and
        periodically (for max_age)."""
        while True:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
            # that arrives just as the event is set, and the task would never end.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PASS_INTERVAL):
                    await self._wake.wait()
            self._wake.clear()
            await self.run_pass()

    async def run_pass(self, force: bool = False) -> Evicted:
        """One pass: down to the low watermark once over the high one (or over the low one
        when `force`d, as `mirror gc` does), and everything older than max_age."""
        async with self._lock:
            return await self._logging_failure(self._pass(force))

    async def _pass(self, force: bool) -> Evicted:
        used = await self.used()
        over = used > (self.low if force else self.high)
        return await self._evict_lru(self.low if over else None)

    async def _evict(self, target: int | None) -> Evicted:
        """Under the lock: `_evict_lru`, a failure logged, never raised."""
        return await self._logging_failure(self._evict_lru(target))

    async def _logging_failure(self, work: Awaitable[Evicted]) -> Evicted:
        try:
            evicted = await work
        except Exception as exc:  # whatever broke, the budget's callers must not see it
            failure = f"{type(exc).__name__}: {exc}"
            if not self._failing:
                log.warning("eviction pass failed (logged once until one works): %s", failure)
            self._failing = True
            return Evicted(0, 0, 0, failure=failure)
        if self._failing:
            log.warning("eviction passes work again")
            self._failing = False
        return evicted

    async def _evict_lru(self, target: int | None) -> Evicted:
        """Evict LRU first until `target` bytes, and what max_age expires."""
        await self.index.flush()  # the latest hits count
        pinned = await self.pinned()
        cutoff = time.time() - self.storage.max_age if self.storage.max_age else None
        used = await self.used()
        count = freed = 0
        after: tuple[float, str] | None = None
        enough = False
        while not enough and (rows := await self.index.lru(after, BATCH)):
            victims = []
            for row in rows:
                expired = cutoff is not None and row.last_access < cutoff
                if not expired and (target is None or used - freed <= target):
                    enough = True
                    break
                # Files first, then rows: a crash in between leaves rows without files,
                # which the next start drops.
                if row.digest not in pinned and self.store.evict(parse_digest(row.digest)):
                    victims.append(row.digest)
                    freed += row.size
                    reason = "age" if expired else "size"
                    self.metrics.evictions.labels(reason).inc()
                    self.metrics.evicted_bytes.inc(row.size)
                    self.activity.evicted(row.digest, row.size, reason)
            await self.index.remove_blobs(victims)
            count += len(victims)
            after = (rows[-1].last_access, rows[-1].digest)
        return self._done(count, freed, used - freed)

    def _done(self, count: int, freed: int, used: int) -> Evicted:
        if count:
            log.info("evicted %d blobs (%d bytes); %d bytes in use", count, freed, used)
        return Evicted(count, freed, used)

    async def pinned(self) -> set[str]:
        """Every digest of the pinned images that is cached: manifests, children, blobs."""
        roots: list[str] = []
        for pin in self.pins:
            route = self.router.route(pin.repository, pin.host)
            if isinstance(pin.reference, Digest):
                roots.append(str(pin.reference))
                continue
            tag = await self.index.tag(route.upstream.name, route.repository, pin.reference)
            if tag is not None:
                roots.append(tag.digest)
        return await content_of(self.index, self.store, roots, self._skipped)
