"""Keeping the shared tier under its budget: LRU eviction by one replica of the fleet.

One replica at a time evicts: the leader, holding the index's leader lock on a connection
of its own. When it dies, its connection ends and the lock is free; another replica's next
try takes it. A replica that does not lead does nothing.

Eviction comes in two steps, a pass each. Over the high watermark, the least recently
used blobs (never pinned content) are marked until the rest fits under the low one: a
marked row is hidden from lookups at once, so no replica hands out a new presigned URL of
it. A URL handed out just before the mark still works for `presign_ttl`, so an object is
deleted, and then its row removed, only once marked for longer than that. A blob uploaded
again meanwhile is unmarked, and keeps its object.

A pass that fails (the database or the bucket unreachable) ends there and is logged, once
until one works again; the task goes on. Nothing here is on a request's path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from mirror.metrics import Metrics
from mirror.reference import parse_digest
from mirror.shared.bucket import Bucket
from mirror.shared.database import SharedIndex

log = logging.getLogger(__name__)

# Rows per query; a batch of deletions holds its rows locked until its objects are gone,
# so it stays small.
BATCH = 64


@dataclass(frozen=True)
class SharedEvicted:
    marked: int  # blobs marked by this pass, their objects deleted by a later one
    deleted: int  # objects deleted (and their rows removed)
    bytes: int  # of the objects deleted
    used: int  # bytes counted against the budget after the pass
    failure: str | None = None  # why the pass failed; then the counts are not known


class SharedEvictor:
    def __init__(
        self,
        index: SharedIndex,
        bucket: Bucket,
        max_size: int,
        presign_ttl: float,
        pinned: Callable[[], Awaitable[set[str]]],
        metrics: Metrics,
        *,
        interval: float = 30.0,
        high: float = 0.9,
        low: float = 0.8,
    ) -> None:
        self.index = index
        self.bucket = bucket
        self.max_size = max_size
        self.presign_ttl = presign_ttl
        self.pinned = pinned
        self.metrics = metrics
        self.interval = interval
        self.high = int(high * max_size)
        self.low = int(low * max_size)
        self._leading = False
        self._failing = False  # the last try failed (and that was logged)
        self._passing = asyncio.Lock()  # `mirror gc` and the task never mark at once

    async def run(self) -> None:
        """The background task: every `interval`, a pass if this replica leads. Cancelled,
        it gives the lead up for another replica to take."""
        try:
            while True:
                if await self._lead():
                    await self.run_pass()
                await asyncio.sleep(self.interval)
        finally:
            self._set_leading(False)
            await self.index.resign()

    async def run_pass(self) -> SharedEvicted:
        """One pass now, leading or not: the objects marked long enough deleted, and, over
        the high watermark, blobs marked down to the low one."""
        async with self._passing:
            try:
                evicted = await self._pass()
            except Exception as exc:  # whatever broke, the task must go on
                failure = f"{type(exc).__name__}: {exc}"
                self._failed(failure)
                return SharedEvicted(0, 0, 0, 0, failure=failure)
            self._worked()
            return evicted

    async def _pass(self) -> SharedEvicted:
        now = time.time()
        deleted, freed = await self._delete_marked(now - self.presign_ttl)
        used = (await self.index.usage()).bytes
        marked = 0
        if used > self.high:
            marked, used = await self._mark(used, now)
        self.metrics.shared_size.set(used)
        self.metrics.shared_max.set(self.max_size)
        if marked or deleted:
            log.info(
                "shared eviction: %d blobs marked, %d objects (%d bytes) deleted; %d bytes in use",
                marked,
                deleted,
                freed,
                used,
            )
        return SharedEvicted(marked, deleted, freed, used)

    async def _mark(self, used: int, now: float) -> tuple[int, int]:
        """Mark blobs least recently used first until `used` is down to the low watermark:
        how many, and the bytes left in use."""
        pinned = await self.pinned()
        marked = 0
        while used > self.low:
            chosen = []
            for blob in await self.index.least_recently_used(BATCH, exclude=pinned):
                if used <= self.low:
                    break
                chosen.append(blob.digest)
                used -= blob.size
            if not chosen:  # nothing left but pinned content
                break
            await self.index.mark(chosen, now)
            marked += len(chosen)
        return marked, used

    async def _delete_marked(self, before: float) -> tuple[int, int]:
        """Delete the objects of the blobs marked before `before`, then their rows: how
        many, and their bytes."""
        deleted = freed = 0
        while True:
            due = await self.index.marked_before(before, BATCH)
            sizes = {blob.digest: blob.size for blob in due}
            removed = await self.index.remove_marked(sizes, before, self._delete_objects)
            for digest in removed:
                self.metrics.shared_evictions.inc()
                self.metrics.shared_evicted_bytes.inc(sizes[digest])
            deleted += len(removed)
            freed += sum(sizes[digest] for digest in removed)
            if len(due) < BATCH:
                return deleted, freed

    async def _delete_objects(self, digests: list[str]) -> None:
        """Every object of `digests` deleted, or the first failure raised once all are
        done (a row stays marked, its object deleted or not, and the next pass retries)."""
        deletions = (self.bucket.delete(parse_digest(digest)) for digest in digests)
        for outcome in await asyncio.gather(*deletions, return_exceptions=True):
            if isinstance(outcome, BaseException):
                raise outcome

    async def _lead(self) -> bool:
        try:
            leading = await self.index.lead()
        except Exception as exc:  # the database unreachable, most likely: not leading now
            self._failed(f"{type(exc).__name__}: {exc}")
            leading = False
        else:
            if not leading:
                self._worked()
        self._set_leading(leading)
        return leading

    def _set_leading(self, leading: bool) -> None:
        if leading != self._leading:
            log.info(
                "this replica %s the shared tier's eviction",
                "leads" if leading else "no longer leads",
            )
        self._leading = leading
        self.metrics.shared_leader.set(1 if leading else 0)

    def _failed(self, failure: str) -> None:
        if not self._failing:
            log.warning("shared eviction failed (logged once until it works again): %s", failure)
        self._failing = True

    def _worked(self) -> None:
        if self._failing:
            log.warning("shared eviction works again")
        self._failing = False
