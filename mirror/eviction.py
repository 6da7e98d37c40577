"""Keeping the cache inside its disk budget (storage/budget.py): LRU eviction.

The evictor runs as a background task, woken when a reservation ends (the cache may have
crossed the high watermark) and once a minute (for `max_age`), and whenever a reservation
finds no room. It walks blobs least recently used first (one indexed query per batch),
deletes the file and then the row, and stops at the low watermark. It skips blobs that
some process holds open (a request reading, a download writing: see `BlobStore.evict`)
and the content of pinned images.

A pass that fails (the index locked by another process past its retries, a disk error)
is logged, once until a pass succeeds again, and ends there: it never fails the request
that needed room, which then finds none and is served uncached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass

from mirror.activity import Activity
from mirror.config import Config
from mirror.metrics import Metrics
from mirror.reference import parse_digest
from mirror.routing import Router
from mirror.storage.blobs import BlobStore
from mirror.storage.budget import Budget
from mirror.storage.images import PinnedImage, Skipped, pinned_content
from mirror.storage.index import Index

log = logging.getLogger(__name__)

PASS_INTERVAL = 60.0  # a pass at least this often, for max_age
BATCH = 512


@dataclass(frozen=True)
class Evicted:
    blobs: int
    bytes: int
    used: int  # bytes counted against the budget after the pass
    failure: str | None = None  # why the pass failed; then the counts are not known


def pinned_images(config: Config) -> tuple[PinnedImage, ...]:
    """The configured pins, as the upstreams they route to know them."""
    router = Router(config.upstreams)
    routes = [(router.route(pin.repository, pin.host), pin) for pin in config.pins]
    return tuple(PinnedImage(r.upstream.name, r.repository, p.reference) for r, p in routes)


class Evictor:
    def __init__(
        self,
        budget: Budget,
        index: Index,
        store: BlobStore,
        pins: Iterable[PinnedImage],
        max_age: float | None,
        metrics: Metrics | None = None,
        activity: Activity | None = None,
    ) -> None:
        self.budget = budget
        self.index = index
        self.store = store
        self.pins = tuple(pins)
        self.max_age = max_age
        self.metrics = metrics or Metrics()
        self.activity = activity or Activity()  # the recent evictions, for the status page
        self._failing = False  # the last pass failed (and that was logged)
        self._skipped = Skipped()  # digests the pins name that no walk can read
        budget.reclaim_with(self._evict)

    async def run(self) -> None:
        """The background task: a pass when woken and over the high watermark, and
        periodically (for max_age)."""
        while True:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
            # that arrives just as the event is set, and the task would never end.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PASS_INTERVAL):
                    await self.budget.released.wait()
            self.budget.released.clear()
            await self.run_pass()

    async def run_pass(self, force: bool = False) -> Evicted:
        """One pass: down to the low watermark once over the high one (or over the low one
        when `force`d, as `mirror gc` does), and everything older than max_age."""
        async with self.budget.lock:
            return await self._logging_failure(self._pass(force))

    async def _pass(self, force: bool) -> Evicted:
        used = await self.budget.used()
        over = used > (self.budget.low if force else self.budget.high)
        if not over and not self._expired((await self.index.usage()).oldest_access):
            # Nothing to do, and reservations wait while this holds the budget's lock: a
            # walk of the index here, after every download, delayed the next one's start.
            return self._done(0, 0, used)
        return await self._evict_lru(self.budget.low if over else None)

    def _expired(self, last_access: float | None) -> bool:
        if self.max_age is None or last_access is None:
            return False
        return last_access < time.time() - self.max_age

    async def _evict(self, target: int | None) -> Evicted:
        """Holding the budget's lock: `_evict_lru`, a failure logged, never raised."""
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
        cutoff = time.time() - self.max_age if self.max_age else None
        used = await self.budget.used()
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
            if victims:
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
        return await pinned_content(self.index, self.store, self.pins, self._skipped)
